// Value Sign Flip: keep the negative prompt boxes editable while VSF is on.
// Forge and Forge Neo disable the negative prompt textbox whenever CFG <= 1 (and the hires negative
// whenever the hires CFG <= 1), because plain CFG 1 ignores the negative. VSF uses the negative at any
// CFG, and CFG 1 is the setting it is made for. So while the tab's VSF accordion is enabled, this script
// removes the host's `disabled` from those textareas; when VSF is switched off, the host's own state comes
// back. Hosts that never disable the box (A1111, gradio 3.41) are left alone: nothing here acts on an
// element the host has not disabled.
//
// The host's wish is learnt from its own `disabled` writes (a MutationObserver); the records of this
// script's own writes are dropped with takeRecords(), so the two are never confused. The textarea stays
// gradio's own element: typing in it fires gradio's input handler, so the typed text is the value sent.
(function () {
    const TABS = {
        txt2img: ["#txt2img_neg_prompt textarea", "#hires_neg_prompt textarea"],
        img2img: ["#img2img_neg_prompt textarea"],
    };

    function vsfEnabled(app, tab) {
        // InputAccordion: a hidden gradio checkbox `<id>-checkbox` holds the value; CheckboxAccordion
        // (lib_vsf/webui/ui.py fallback) uses the same id for a visible one.
        const box = app.querySelector(`#vsf_${tab}_enabled-checkbox input[type=checkbox]`);
        return Boolean(box && box.checked);
    }

    function watchTextarea(textarea, isOn) {
        const state = { hostDisabled: textarea.disabled };
        const observer = new MutationObserver(function () {
            state.hostDisabled = textarea.disabled;
            apply();
        });
        function apply() {
            const want = state.hostDisabled && !isOn();
            if (textarea.disabled !== want) {
                textarea.disabled = want;
            }
            observer.takeRecords();
        }
        observer.observe(textarea, { attributes: true, attributeFilter: ["disabled"] });
        return apply;
    }

    function setupTab(app, tab) {
        const accordion = app.querySelector(`#vsf_${tab}_enabled`);
        if (!accordion) return;
        const isOn = () => vsfEnabled(app, tab);
        const appliers = [];
        for (const selector of TABS[tab]) {
            const textarea = app.querySelector(selector);
            if (textarea) appliers.push(watchTextarea(textarea, isOn));
        }
        if (!appliers.length) return;
        const update = () => appliers.forEach((fn) => fn());

        // The enable state changes by a click on the accordion's checkbox (input events), by opening or
        // closing the accordion while linked, and by pasted infotext (gradio sets the hidden checkbox
        // and the host's inputAccordionChecked toggles the accordion): all end in an event or a class change.
        const hidden = app.querySelector(`#vsf_${tab}_enabled-checkbox input[type=checkbox]`);
        const visible = app.querySelector(`#vsf_${tab}_enabled-visible-checkbox`);
        for (const box of [hidden, visible]) {
            if (!box) continue;
            box.addEventListener("input", () => setTimeout(update, 0));
            box.addEventListener("change", () => setTimeout(update, 0));
        }
        new MutationObserver(() => setTimeout(update, 0))
            .observe(accordion, { attributes: true, subtree: true, attributeFilter: ["class"] });
        update();
    }

    function setup() {
        const app = typeof gradioApp === "function" ? gradioApp() : document;
        for (const tab of Object.keys(TABS)) setupTab(app, tab);
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(setup);
    } else {
        document.addEventListener("DOMContentLoaded", setup);
    }
})();
