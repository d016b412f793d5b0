// Value Sign Flip: tooltips for every control of the accordion (txt2img and img2img).
// Generic labels ("Method", "Preset") are shared with other extensions, so tooltips are attached by
// elem_id (vsf_<tab>_<control>, see lib_vsf/webui/ui.py) once the UI has loaded; the labels that are
// unique to VSF are also added to the host's `titles` table so its own hint code shows them.
(function () {
    const VSF_TIPS = {
        enabled: "Value Sign Flip: make few-step models at CFG 1 obey the negative prompt. Image tokens attend to the negative prompt with sign-flipped values, inside attention, in the same single pass.",
        method: "VSF: sign-flipped negative values (the paper's method). NAG: normalized attention guidance. NASA: subtract the negative attention. NAG and NASA are baselines for comparison.",
        preset: "Model default (the default): VSF with the loaded model family's numbers (SD3 3.5/0.1, Flux 6/0.2 with lambda 8, Wan 1.7/0.2, SD1.5/SDXL 3.3/0.2); method, alpha, beta and lambda sliders are not used. Other presets fill method, alpha and beta: VSF Quality (3.3/0.2) keeps quality; VSF Strong (3.8/0.2) removes more. Moving a slider switches to Custom.",
        alpha: "Strength: how strongly the negative prompt is subtracted (VSF: value scale; NAG: extrapolation phi; NASA: subtraction scale). VSF typically 0-6, NASA 0-1.",
        beta: "VSF: logit bias against the negative tokens (higher = weaker, smoother); NAG: blend back towards the unguided result (0-1). Unused by NASA.",
        lambda: "Flux only: push the negative prompt's embedding away from the empty prompt before use (paper: 8 for Flux Schnell). 0 = off. Ignored by SD3.",
        start: "First step with guidance, as a fraction of the sampling steps (0 = from the first step).",
        end: "Guidance stops at this fraction of the steps (1 = until the end). Outside the window the step is the plain pass.",
        single_pass: "Run one conditional pass (CFG scale treated as 1): VSF replaces CFG, so the image costs one model call per step. Off: CFG runs as usual and VSF is added to its conditional pass.",
        show_map: "Add one image per output: a heatmap over the image of the share of attention that goes to the flipped negative prompt (VSF only; NAG and NASA have no such share). The image itself is unchanged. The note under the image gives the mean and maximum share.",
        negative_image: "Optional, for edit models that take reference images (Flux Kontext, Qwen-Image-Edit on Forge Neo): a picture the result should move away from, applied like the negative prompt (both together form one negative). Resized to the output size and encoded like an input image. Other models refuse it. The infotext records a hash of it, not the image, so pasting cannot restore it.",
    };
    const UNIQUE_LABELS = {
        "Value Sign Flip": VSF_TIPS.enabled,
        "Alpha (negative strength)": VSF_TIPS.alpha,
        "Beta (negative bias)": VSF_TIPS.beta,
        "Flux lambda (negative extrapolation)": VSF_TIPS.lambda,
        "Start (fraction of steps)": VSF_TIPS.start,
        "End (fraction of steps)": VSF_TIPS.end,
        "Single pass (replace CFG)": VSF_TIPS.single_pass,
        "Show where the negative acts": VSF_TIPS.show_map,
        "Negative image (Flux Kontext, Qwen-Image-Edit)": VSF_TIPS.negative_image,
    };
    if (typeof titles === "object" && titles !== null) {
        Object.assign(titles, UNIQUE_LABELS);
    }

    function attach() {
        const app = typeof gradioApp === "function" ? gradioApp() : document;
        for (const tab of ["txt2img", "img2img"]) {
            for (const [name, tip] of Object.entries(VSF_TIPS)) {
                const el = app.querySelector(`#vsf_${tab}_${name}`);
                if (!el) continue;
                el.title = tip;
                el.querySelectorAll("label, span, input, select").forEach((child) => { child.title = tip; });
            }
        }
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(attach);
    } else {
        document.addEventListener("DOMContentLoaded", attach);
    }
})();
