"""Build the offline Hugging Face cache AUTOMATIC1111 1.10 asks for when it loads a model, with no hub access.

A1111 loads, by name, at every model load:
  * `openai/clip-vit-large-patch14`: CLIPTokenizer (SD1.5, SDXL, SD3) and the CLIP config (SD1.5/SDXL build
    their text encoder from it; the weights come from the checkpoint). The tokenizer is the real CLIP BPE
    vocabulary, rebuilt from the `bpe_simple_vocab_16e6.txt.gz` merges file that open_clip ships: 256 byte
    symbols, the same with `</w>`, one token per merge (the first 48894 merges), then the two specials —
    49408 ids, as CLIP's own tokenizer numbers them.
  * `google/t5-v1_1-xxl`: T5TokenizerFast (SD3's conditioner always builds one, even with T5 off). A stand-in:
    a small Unigram tokenizer.json with T5's special tokens (`<pad>` 0, `</s>` 1, `<unk>` 2) and a few hundred
    pieces; only used if T5 is switched on, which the tests do not do.

Run with the host's venv (needs transformers and tokenizers, and open_clip for the merges file):
    python tests/e2e/make_a1111_hf_cache.py HF_DIR
then start A1111 with HF_HOME=HF_DIR HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os

# Any fixed 40-hex name: the cache maps refs/main to snapshots/<name>/.
SNAPSHOT = "0" * 39 + "1"

# openai/clip-vit-large-patch14 as published (CLIPConfig; the text part is what A1111 builds).
CLIP_L_CONFIG = {
    "architectures": ["CLIPModel"],
    "model_type": "clip",
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
    "initializer_factor": 1.0,
    "text_config": {
        "model_type": "clip_text_model", "hidden_size": 768, "intermediate_size": 3072,
        "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 77,
        "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "dropout": 0.0, "attention_dropout": 0.0,
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "image_size": 224,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    },
}
CLIP_SPECIALS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                 "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP uses: vocabulary 49408 = 2*256 + merges + 2 specials


def snapshot_dir(hf_home: str, repo_id: str) -> str:
    base = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(SNAPSHOT)
    path = os.path.join(base, "snapshots", SNAPSHOT)
    os.makedirs(path, exist_ok=True)
    return path


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


def clip_bpe_merges() -> list[tuple[str, str]]:
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + CLIP_MERGES]]  # line 0 is a version header
    assert len(merges) == CLIP_MERGES and all(len(m) == 2 for m in merges), "unexpected merges file"
    return merges


def build_clip_l(hf_home: str) -> str:
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    out = snapshot_dir(hf_home, "openai/clip-vit-large-patch14")
    merges = clip_bpe_merges()
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408 and len(set(tokens)) == len(tokens)
    write_json(os.path.join(out, "vocab.json"), {t: i for i, t in enumerate(tokens)})
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    write_json(os.path.join(out, "special_tokens_map.json"), CLIP_SPECIALS)
    write_json(os.path.join(out, "tokenizer_config.json"),
               dict(CLIP_SPECIALS, tokenizer_class="CLIPTokenizer", model_max_length=77,
                    do_lower_case=True, errors="replace", add_prefix_space=False))
    write_json(os.path.join(out, "config.json"), CLIP_L_CONFIG)
    return out


def build_t5_standin(hf_home: str) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    out = snapshot_dir(hf_home, "google/t5-v1_1-xxl")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    pieces += [("\u2581" + c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    words = ("a photo of the cat dog in on with blurry red blue green painting portrait city house tree "
             "sky water man woman car forest mountain").split()
    pieces += [("\u2581" + w, -3.0) for w in words]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Replace("  ", " ")
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(os.path.join(out, "tokenizer.json"))
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    write_json(os.path.join(out, "special_tokens_map.json"), specials)
    write_json(os.path.join(out, "tokenizer_config.json"),
               dict(specials, tokenizer_class="T5Tokenizer", extra_ids=0, model_max_length=512))
    return out


def check(hf_home: str) -> None:
    """Load both the way A1111 does (offline, HF_HOME set by main before transformers is imported)."""
    from transformers import CLIPTextConfig, CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")
    ids = clip("a photo of a cat")["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 7, ids  # CLIP: 1 token per common word
    assert CLIPTextConfig.from_pretrained("openai/clip-vit-large-patch14").num_hidden_layers == 12
    t5 = T5TokenizerFast.from_pretrained("google/t5-v1_1-xxl")
    t5_ids = t5("a photo of a cat")["input_ids"]
    assert t5_ids[-1] == 1 and 2 not in t5_ids, t5_ids
    print("CLIP-L tokenizer:", ids, "| T5 stand-in:", t5_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("hf_home", help="folder to use as HF_HOME")
    hf_home = os.path.abspath(ap.parse_args().hf_home)
    # transformers reads these when it is first imported
    os.environ["HF_HOME"] = hf_home
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    print("wrote", build_clip_l(hf_home))
    print("wrote", build_t5_standin(hf_home))
    check(hf_home)


if __name__ == "__main__":
    main()
