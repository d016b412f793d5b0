"""`python -m lib_vsf.bench`: what guidance costs, one attention call and one whole transformer forward.

Times, in one run and on one device: the unguided pass, CFG (batch 2), VSF through the dense-mask
reference (`vsf_reference`, float32 math) and through a paper-style dense additive mask in SDPA
(`vsf_dense_sdpa`), the fast exact VSF (`vsf_fast`), NAG and NASA. The models are diffusers
transformers built from a config with random weights (presets in `models.py`), so no checkpoint
is needed. It also checks the fast path against the reference on the same inputs, prints a table and
optionally writes JSON (median ms, ratio to unguided, peak memory).

    python -m lib_vsf.bench                                   # tiny preset on CPU
    python -m lib_vsf.bench --preset sd35-large --json out.json   # on a GPU, bf16
    python -m lib_vsf.bench --preset flux-dev --attention-only
    python -m lib_vsf.bench --negative-map --ab-rounds 5       # + the negative-attention map's cost
    python -m lib_vsf.bench --backend xformers                 # unguided, CFG, VSF fast on one library

The whole-forward part installs the processors of `lib_vsf.diffusers` on the bare transformer (see
`guided_inputs`); without diffusers it is skipped and says why.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from ..attention import fast as attention_fast
from ..attention import cross_attention, joint_attention
from ..attention.reference import vsf_cross_reference, vsf_joint_reference
from .measure import (METHODS, cfg_batch, forced_backend, guided_inputs, heads_view, sync, timed,
                      triton_disabled)
from .models import PRESETS, Preset, build_model
from ..layout import IMAGE, NEGATIVE, TokenLayout, text_layout

ROWS = ("unguided", "cfg", "vsf_reference", "vsf_dense_sdpa", "vsf_fast", "vsf_fast_torch", "vsf_fast_map", "nag",
        "nasa")  # vsf_fast_map: vsf_fast recording the negative-attention map (--negative-map)


# ---------------------------------------------------------------------------------------------------------
# Timing


def _fits(n_bytes: float, device: torch.device) -> bool:
    """Can a transient of `n_bytes` be allocated without risking the run?"""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return n_bytes < 0.6 * free
    return n_bytes < 4 * 2**30


# ---------------------------------------------------------------------------------------------------------
# Paper-style dense-mask VSF (the cost anchor): full [.., N1] sequence and an additive Lq x Lk mask in SDPA


class DenseSdpaVSF:
    """VSF as the paper's code computes it: keys/values extended by N1, one SDPA call with a dense
    additive mask in the model dtype (cached per layout shape). Unpadded negatives only."""

    def __init__(self):
        self.cache: dict = {}

    def mask(self, layout: TokenLayout, beta: float, device, dtype) -> torch.Tensor:
        key = (layout.length, layout.positive.start, layout.negative.start, layout.negative_len, beta, str(device), dtype)
        if key not in self.cache:
            roles = layout.roles(device)
            q_role = roles[:, None]
            main = torch.where(q_role == NEGATIVE, roles[None, :] != 1, roles[None, :] != NEGATIVE)
            n1 = (q_role == IMAGE).expand(-1, layout.negative_len)
            allow = torch.cat([main, n1], 1)
            bias = torch.zeros(allow.shape, device=device)
            bias[:, layout.length:] = -beta
            self.cache = {key: torch.where(allow, bias, float("-inf")).to(dtype)[None, None]}
        return self.cache[key]

    def joint(self, q, k, v, layout, alpha, beta, scale=None):
        neg = layout.negative
        keys = torch.cat([k, k[:, :, neg]], 2)
        values = torch.cat([v, -alpha * v[:, :, neg]], 2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask(layout, beta, q.device, q.dtype),
                                              scale=scale)


@contextlib.contextmanager
def vsf_implementation(joint=None, cross=None):
    """Route `lib_vsf.attention`'s VSF calls through other implementations for a while."""
    saved = attention_fast.vsf_joint, attention_fast.vsf_cross
    try:
        if joint is not None:
            attention_fast.vsf_joint = joint
        if cross is not None:
            attention_fast.vsf_cross = cross
        yield
    finally:
        attention_fast.vsf_joint, attention_fast.vsf_cross = saved


def triton_report(device, dtype, head_dim) -> dict:
    """Triton version and which fused kernels the automatic choice uses here."""
    try:
        import triton

        version = triton.__version__
    except Exception as err:  # noqa: BLE001
        version = f"unavailable ({type(err).__name__})"
    return {"version": version, **attention_fast.triton_status(device, dtype, head_dim)}


# ---------------------------------------------------------------------------------------------------------
# One attention call at the preset's shapes


def attention_section(p: Preset, device, dtype, warmup, repeats, batch=1, reference=True,
                      profile=False, negative_map=False) -> tuple[dict, dict]:
    """Time every method on one attention call; return (timings, numerical checks)."""
    gen = torch.Generator().manual_seed(0)
    li, lp, n, h, d = p.image_tokens, p.positive_tokens, p.negative_tokens, p.heads, p.head_dim
    alpha, beta = METHODS["vsf"].alpha, METHODS["vsf"].beta
    res, check, skipped = {}, {}, {}
    dense = DenseSdpaVSF()
    if p.kind == "joint":
        r = p.reference_tokens
        length = li + lp + n + r
        if p.negative_first:  # text first, negatives first: [N0, P, I] (Kontext: [N0, P, I, R])
            layout = text_layout(lp, n, negative_first=True, total=length,
                                 reference=slice(length - r, length) if r else None)
        else:  # [I, P, N0]
            layout = text_layout(lp, n, offset=li)
        q, k, v = (heads_view(batch, h, length, d, device, dtype, gen) for _ in range(3))
        keep = slice(n, length) if p.negative_first else slice(0, li + lp)  # {I, P}: contiguous in both
        qu, ku, vu = q[:, :, keep], k[:, :, keep], v[:, :, keep]
        guided = lambda g, **kw: joint_attention(q, k, v, layout, g, **kw)  # noqa: E731
        ref_fn = lambda: vsf_joint_reference(q, k, v, layout, alpha, beta)  # noqa: E731
        dense_fn = lambda: dense.joint(q, k, v, layout, alpha, beta)  # noqa: E731
        ref_bytes = 4 * 4 * batch * h * length * (length + n)
        dense_bytes = 2 * batch * length * (length + n) * q.element_size()
    else:
        layout = text_layout(lp, n)
        q = heads_view(batch, h, li, d, device, dtype, gen)
        k, v = (heads_view(batch, h, lp + n, d, device, dtype, gen) for _ in range(2))
        qu, ku, vu = q, k[:, :, :lp], v[:, :, :lp]
        guided = lambda g, **kw: cross_attention(q, k, v, layout, g, **kw)  # noqa: E731
        ref_fn = lambda: vsf_cross_reference(q, k, v, layout, alpha, beta)  # noqa: E731
        dense_fn = lambda: attention_fast._vsf_cross_sdpa(q, k, v, layout, alpha, beta)  # noqa: E731
        ref_bytes = 4 * 4 * batch * h * li * (lp + n)
        dense_bytes = 0
    q2, k2, v2 = (torch.cat([t, t]) for t in (qu, ku, vu))

    def guided_torch(g):
        with triton_disabled():
            return guided(g).float()

    base = timed(lambda: F.scaled_dot_product_attention(qu, ku, vu), device, warmup, repeats)
    res["unguided"] = {**base, "ratio": 1.0}
    bm = base["median_ms"]
    res["cfg"] = timed(lambda: F.scaled_dot_product_attention(q2, k2, v2), device, warmup, repeats, bm)
    del q2, k2, v2
    if reference and _fits(ref_bytes, device):
        res["vsf_reference"] = timed(ref_fn, device, 1, max(1, min(3, repeats)), bm)
    else:
        skipped["vsf_reference"] = f"needs ~{ref_bytes / 2**30:.1f} GiB of float32 logits" if reference else "off"
    if _fits(dense_bytes + ref_bytes / 8, device):
        res["vsf_dense_sdpa"] = timed(dense_fn, device, warmup, repeats, bm)
    else:
        skipped["vsf_dense_sdpa"] = "dense mask does not fit"
    res["vsf_fast"] = timed(lambda: guided(METHODS["vsf"]), device, warmup, repeats, bm)
    with triton_disabled():
        res["vsf_fast_torch"] = timed(lambda: guided(METHODS["vsf"]), device, warmup, repeats, bm)
    if negative_map:
        from ..state import NegativeShareMap

        recorder = NegativeShareMap()
        res["vsf_fast_map"] = timed(lambda: guided(METHODS["vsf"], negative_share=recorder), device, warmup,
                                    repeats, bm)
    res["nag"] = timed(lambda: guided(METHODS["nag"]), device, warmup, repeats, bm)
    res["nasa"] = timed(lambda: guided(METHODS["nasa"]), device, warmup, repeats, bm)

    with torch.no_grad():
        fast = guided(METHODS["vsf"]).float()
        if "vsf_reference" in res or _fits(ref_bytes, device):
            want = ref_fn().float()  # float32 math on the same (dtype) inputs
            err = (fast - want).abs()
            check["vsf_fast_vs_reference_max_abs"] = float(err.max())
            check["vsf_fast_vs_reference_mean_abs"] = float(err.mean())
            check["reference_max_abs_value"] = float(want.abs().max())
            with triton_disabled():
                err = (guided(METHODS["vsf"]).float() - want).abs()
            check["vsf_fast_torch_vs_reference_max_abs"] = float(err.max())
            check["vsf_fast_torch_vs_reference_mean_abs"] = float(err.mean())
            check["vsf_fast_vs_fast_torch_max_abs"] = float((fast - guided_torch(METHODS["vsf"])).abs().max())
            if "vsf_dense_sdpa" in res:
                check["vsf_dense_sdpa_vs_reference_max_abs"] = float((dense_fn().float() - want).abs().max())
            # Yardstick: how far the unguided kernel itself is from float32 math at this dtype.
            plain = F.scaled_dot_product_attention(qu, ku, vu).float()
            plain32 = F.scaled_dot_product_attention(qu.float(), ku.float(), vu.float())
            check["unguided_kernel_vs_float32_max_abs"] = float((plain - plain32).abs().max())
            del want, plain, plain32
        if negative_map:  # the map must not change the call's output
            mapped = guided(METHODS["vsf"], negative_share=NegativeShareMap()).float()
            check["vsf_fast_map_vs_fast_max_abs"] = float((mapped - fast).abs().max())
            check["vsf_fast_map_overhead"] = round(res["vsf_fast_map"]["median_ms"] / res["vsf_fast"]["median_ms"], 4)
        check["backend"] = attention_fast.select_backend(q.device, q.dtype, d)[0]
        check["triton"] = triton_report(q.device, q.dtype, d)

    # Every usable LSE backend: the {I, P} pass with LSE alone, and the whole fast VSF call.
    per_backend = {}
    for name in attention_fast._ORDER.get(device.type, ("chunked",)):
        with forced_backend(name), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen = attention_fast.select_backend(q.device, q.dtype, d)[0]
            if chosen != name:
                per_backend[name] = "unavailable"
                continue
            fn = attention_fast.select_backend(q.device, q.dtype, d)[1]
            per_backend[name] = {
                "lse_pass": timed(lambda: fn(qu, ku, vu, 1 / math.sqrt(d)), device, warmup, repeats, bm),
                "vsf_fast": timed(lambda: guided(METHODS["vsf"]), device, warmup, repeats, bm),
            }
    check["skipped"] = skipped
    table = _profile(lambda: guided(METHODS["vsf"]), device) if profile else None
    return res, {"check": check, "backends": per_backend, "profile": table}


def _profile(fn, device) -> str | None:
    """Kernel time table of one call (CUDA only): where the time beyond the unguided pass goes."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad():
            fn()  # first-use work (backend and kernel checks, compilation) stays out of the table
            sync(device)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            sync(device)
        return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60)
    except Exception as err:  # noqa: BLE001
        return f"profiler failed: {err!r:.200}"


# ---------------------------------------------------------------------------------------------------------
# One whole transformer forward


def forward_section(p: Preset, device, dtype, warmup, repeats, batch=1, reference=True, ab_rounds=0,
                    profile=False, negative_map=False) -> tuple[dict, dict]:
    """Time one whole transformer forward per method; return (timings, checks). Needs diffusers.

    `ab_rounds`: then also time unguided / vsf_fast / vsf_fast_torch round-robin (5 forwards each per
    round), so that drift of the machine hits all three alike. `profile`: kernel tables of one
    vsf_fast and one vsf_fast_torch forward (CUDA)."""
    try:
        import diffusers  # noqa: F401

        from .. import diffusers as _lib_diffusers  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return {}, {"skipped": f"whole forward needs diffusers and lib_vsf.diffusers: {err!r:.200}"}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(p, device, dtype)
    checks = {"model_init_s": round(time.perf_counter() - t0, 1),
              "parameters_b": round(sum(x.numel() for x in model.parameters()) / 1e9, 3)}
    kwargs = p.make_inputs(p, batch, device, dtype)
    text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else kwargs["cap_feats"][0]
    negative = torch.randn(batch, p.negative_tokens, text.shape[-1], device=device, dtype=dtype)

    def fwd(kw):
        out = model(**kw, return_dict=False)[0]
        return torch.stack(out) if isinstance(out, list) else out  # Z-Image returns one tensor per sample
    res, skipped = {}, {}
    with torch.no_grad():
        res["unguided"] = {**timed(lambda: fwd(kwargs), device, warmup, repeats), "ratio": 1.0}
        bm = res["unguided"]["median_ms"]
        cfg_kwargs = cfg_batch(kwargs, batch)
        res["cfg"] = timed(lambda: fwd(cfg_kwargs), device, warmup, repeats, bm)
        del cfg_kwargs
        outputs = {}
        length = p.image_tokens + p.positive_tokens + p.negative_tokens + p.reference_tokens
        ref_bytes = 4 * 4 * batch * p.heads * (length * (length + p.negative_tokens) if p.kind == "joint"
                                                else p.image_tokens * (p.positive_tokens + p.negative_tokens))
        dense = DenseSdpaVSF()
        variants = [("vsf_fast", "vsf", {}), ("vsf_fast_torch", "vsf", {}), ("nag", "nag", {}), ("nasa", "nasa", {})]
        if negative_map:
            variants.insert(2, ("vsf_fast_map", "vsf", {}))
        if reference and _fits(ref_bytes, device):
            variants.append(("vsf_reference", "vsf", dict(joint=vsf_joint_reference, cross=vsf_cross_reference)))
        else:
            skipped["vsf_reference"] = f"needs ~{ref_bytes / 2**30:.1f} GiB per attention" if reference else "off"
        if p.kind == "joint":
            variants.append(("vsf_dense_sdpa", "vsf", dict(joint=dense.joint)))
        for name, method, impl in variants:
            with guided_inputs(model, p, METHODS[method], kwargs, negative, name == "vsf_fast_map") as gkw, \
                    vsf_implementation(**impl), \
                    triton_disabled(name == "vsf_fast_torch"):
                slow = name == "vsf_reference"
                res[name] = timed(lambda: fwd(gkw), device, 1 if slow else warmup,
                                  max(1, min(3, repeats)) if slow else repeats, bm)
                if name in ("vsf_fast", "vsf_fast_torch", "vsf_reference", "vsf_fast_map"):
                    outputs[name] = fwd(gkw).float()
        if ab_rounds:
            guided_names = ["vsf_fast", "vsf_fast_torch"] + (["vsf_fast_map"] if negative_map else [])
            ab = {name: [] for name in ["unguided"] + guided_names}
            for r in range(ab_rounds):
                ab["unguided"].append(timed(lambda: fwd(kwargs), device, 1, 5)["median_ms"])
                # The guided variants' order rotates round by round, so that a place in the round (the one
                # after unguided, say) costs every variant alike.
                for name in guided_names[r % len(guided_names):] + guided_names[:r % len(guided_names)]:
                    with guided_inputs(model, p, METHODS["vsf"], kwargs, negative, name == "vsf_fast_map") as gkw, \
                            triton_disabled(name == "vsf_fast_torch"):
                        ab[name].append(timed(lambda: fwd(gkw), device, 1, 5)["median_ms"])
            base = statistics.median(ab["unguided"])
            checks["ab_interleaved"] = {name: {"median_ms": round(statistics.median(t), 4),
                                               "ratio": round(statistics.median(t) / base, 3),
                                               # median over rounds of this round's time / vsf_fast's
                                               "paired_vs_vsf_fast": round(statistics.median(
                                                   a / b for a, b in zip(t, ab["vsf_fast"])), 4),
                                               "round_medians_ms": t} for name, t in ab.items()}
        if profile and device.type == "cuda":
            with guided_inputs(model, p, METHODS["vsf"], kwargs, negative) as gkw:
                for name in ("vsf_fast", "vsf_fast_torch"):
                    with triton_disabled(name == "vsf_fast_torch"):
                        checks[f"profile_{name}"] = _profile(lambda: fwd(gkw), device)
        if "vsf_reference" in outputs:
            err = (outputs["vsf_fast"] - outputs["vsf_reference"]).abs()
            checks["vsf_fast_vs_reference_max_abs"] = float(err.max())
            checks["vsf_fast_vs_reference_mean_abs"] = float(err.mean())
            checks["reference_max_abs_value"] = float(outputs["vsf_reference"].abs().max())
            err = (outputs["vsf_fast_torch"] - outputs["vsf_reference"]).abs()
            checks["vsf_fast_torch_vs_reference_max_abs"] = float(err.max())
            checks["vsf_fast_torch_vs_reference_mean_abs"] = float(err.mean())
        if "vsf_fast_map" in outputs:  # the map must not change the forward (torch path: bit for bit)
            checks["vsf_fast_map_vs_fast_max_abs"] = float((outputs["vsf_fast_map"] - outputs["vsf_fast"]).abs().max())
            checks["vsf_fast_map_overhead"] = round(res["vsf_fast_map"]["median_ms"] / res["vsf_fast"]["median_ms"], 4)
    checks["skipped"] = skipped
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res, checks


# ---------------------------------------------------------------------------------------------------------
# CLI


def _table(title: str, rows: dict) -> str:
    lines = [title, f"  {'method':<16}{'median ms':>12}{'x unguided':>12}{'peak MiB':>12}"]
    for name in ROWS:
        r = rows.get(name)
        if not r:
            continue
        peak = "-" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        lines.append(f"  {name:<16}{r['median_ms']:>12.3f}{r['ratio']:>12.3f}{peak:>12}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m lib_vsf.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model and shapes (default: tiny on CPU, sd35-large on CUDA)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 30 attention / 10 forward)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--attention-only", action="store_true")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--no-reference", action="store_true", help="skip the float32 dense reference timings")
    ap.add_argument("--profile", action="store_true",
                    help="print a CUDA kernel table of the fast VSF call (disturbs later timings: run alone)")
    ap.add_argument("--ab-rounds", type=int, default=0,
                    help="also time unguided / vsf_fast / vsf_fast_torch forwards round-robin, this many rounds")
    ap.add_argument("--negative-map", action="store_true",
                    help="also time vsf_fast recording the negative-attention map (row vsf_fast_map; with --ab-rounds, "
                         "round-robin too)")
    ap.add_argument("--backend", choices=("sdpa", "flash", "xformers", "sage"), default=None,
                    help="time unguided, CFG and VSF fast with everything on this attention library "
                         "(bench/per_backend.py); an unavailable one exits with status 2")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[args.preset or ("sd35-large" if device.type == "cuda" else "tiny")]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    warmup = 1 if args.repeats == 1 else (args.warmup if args.warmup is not None else 5)
    if args.warmup is not None:
        warmup = args.warmup
    out = {
        "preset": preset.name, "note": preset.note, "device": torch.cuda.get_device_name(device)
        if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "python": sys.version.split()[0],
        "shapes": {"heads": preset.heads, "head_dim": preset.head_dim, "image_tokens": preset.image_tokens,
                   "positive_tokens": preset.positive_tokens, "negative_tokens": preset.negative_tokens,
                   "reference_tokens": preset.reference_tokens,
                   "batch": args.batch, "kind": preset.kind,
                   "order": ("[N0, P, I, R]" if preset.reference_tokens else "[N0, P, I]") if preset.negative_first else "[I, P, N0]" if preset.kind == "joint"
                   else "image queries, keys [P, N]"},
        "guidance": {k: vars(g) for k, g in METHODS.items()},
        "backend": attention_fast.select_backend(device, dtype, preset.head_dim)[0],
        "triton": triton_report(device, dtype, preset.head_dim),
        "attention": {}, "forward": {}, "check": {},
    }
    try:
        import diffusers

        out["diffusers"] = diffusers.__version__
    except Exception:  # noqa: BLE001
        out["diffusers"] = None
    t0 = time.perf_counter()
    if args.backend:
        return _backend_main(args, out, preset, device, dtype, warmup, t0)
    if not args.forward_only:
        rows, extra = attention_section(preset, device, dtype, warmup, args.repeats or 30, args.batch,
                                        not args.no_reference, args.profile, args.negative_map)
        out["attention"], out["attention_backends"] = rows, extra["backends"]
        out["attention_profile"] = extra["profile"]
        if extra["profile"]:
            print(extra["profile"])
        out["check"]["attention"] = extra["check"]
        print(_table(f"one attention call ({preset.name}, {out['dtype']}, {out['device']})", rows))
        print("  fast vs reference:", json.dumps({k: v for k, v in extra["check"].items() if k != "skipped"}))
        for name, r in extra["backends"].items():
            if isinstance(r, dict):
                print(f"  backend {name:<10} LSE pass {r['lse_pass']['ratio']:.3f}x   VSF fast {r['vsf_fast']['ratio']:.3f}x")
            else:
                print(f"  backend {name:<10} {r}")
    if not args.attention_only:
        rows, checks = forward_section(preset, device, dtype, 2 if args.repeats == 1 else min(warmup, 3),
                                       args.repeats or 10, args.batch, not args.no_reference, args.ab_rounds,
                                       args.profile, args.negative_map)
        out["forward"], out["check"]["forward"] = rows, checks
        if rows:
            print(_table(f"whole transformer forward ({preset.name})", rows))
        for name in ("vsf_fast", "vsf_fast_torch"):
            if checks.get(f"profile_{name}"):
                print(f"forward profile, {name}:\n" + checks[f"profile_{name}"])
        print("  forward checks:", json.dumps({k: v for k, v in checks.items() if not k.startswith("profile_")}))
    return _finish(args, out, t0)


def _finish(args, out, t0) -> int:
    """Record the run's wall time and write the JSON report when `--json` asks for one."""
    out["elapsed_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print("wrote", args.json)
    return 0


def _backend_main(args, out, preset, device, dtype, warmup, t0) -> int:
    """`--backend NAME`: the per-library rows only (per_backend.py)."""
    from . import per_backend

    try:
        res = per_backend.run(args, preset, device, dtype, warmup)
    except per_backend.UnavailableBackend as err:
        print(f"VSF bench: {err}. Installed: {json.dumps(per_backend.installed_versions())}", file=sys.stderr)
        return 2
    out.update(res)
    print(f"backend {args.backend}: {res['lse_path']}")
    print("  installed:", json.dumps(res["installed"]))
    if res.get("attention"):
        print(_table(f"one attention call on {args.backend} ({preset.name}, {out['dtype']}, {out['device']})",
                     res["attention"]))
        check = dict(res["attention_check"])
        ops = check.pop("aten_ops", None)
        print("  checks:", json.dumps(check))
        if ops:
            print(f"  aten ops per VSF call: {ops['total']} ({ops['compute']} compute): {json.dumps(ops['ops'])}")
    if res.get("forward"):
        print(_table(f"whole transformer forward on {args.backend} ({preset.name})", res["forward"]))
        print("  checks:", json.dumps(res["forward_check"]))
    elif "forward_check" in res:
        print("  forward:", json.dumps(res["forward_check"]))
    return _finish(args, out, t0)


if __name__ == "__main__":
    raise SystemExit(main())
