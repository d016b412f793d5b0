"""Qwen-Image, Qwen-Image-Edit and Qwen-Image-Edit-Plus (diffusers `QwenImageTransformer2DModel` in
`QwenImagePipeline`, `QwenImageEditPipeline`, `QwenImageEditPlusPipeline`): joint attention in the
double-stream blocks, text first.

The negative tokens go before the positive ones in the text stream, so each block's joint sequence is
`[N0, P, I, R]`: image, positive and reference tokens stay one contiguous span for the fast path.

- N0 is the pipeline's own `encode_prompt` of the negative, one prompt at a time, so without padding (the
  chat template and its dropped system tokens are the pipeline's). The Edit pipelines encode every prompt,
  the negative of their own CFG pass included, with the input image(s) in the Qwen2.5-VL prompt; VSF does
  the same: the negative is encoded per pipeline call with the call's image(s), prepared as the pipeline
  prepares them (`QwenImageEditPipeline`: resized to about 1024x1024 pixels; Edit Plus: each image to about
  384x384, "Picture i:" before each). The embeddings are cached per image content.
- Positions (MSRoPE): text token `j` sits at `(m + j, m + j, m + j)` with `m` fixed by the image extent
  (the model's `pos_embed`, from `img_shapes`), so text positions start after the image. In a negative
  pass N's tokens sit at `m + j`; so do N0's here (the first rows of the model's text table), and P keeps
  its own `m + j` (the model would otherwise shift P by the negative's length).
- The model's text mask (`encoder_hidden_states_mask`, the positive's batch padding) stays the positive's
  (`TokenLayout.positive_mask`); the negative is unpadded, its batch padding is the layout's negative mask.
  The mask handed to the model grows with the negative so that its own checks see the longer stream.
- Edit pipelines append the packed reference latents after the noisy image tokens in the image stream and
  slice them off the output; they are the R tokens of the layout (`img_shapes`: the first entry is the
  image, the others the references). R rows attend I, P, R; N0 rows attend I, R, N0; only image rows see
  N1.
- CFG is `true_cfg_scale` (a second pass when it is > 1 and a negative is given): VSF sets it to 1 and
  drops the negative; `guidance_scale` is the guidance embedding of distilled checkpoints and stays the
  user's.

Negative images (Qwen-Image-Edit, docs/negative-images.md): the picture is encoded as the pipeline encodes
its input image (resized to about 1024x1024 pixels at its own aspect ratio, preprocessed, the VAE's argmax
latent normalised by the latents mean/std, 2x2 packing) and put first in the image stream, the text
negative last in the text stream: `[P, N_txt | N_img, I, R]`. Its MSRoPE rows are those the model computes
for it as one more entry of `img_shapes` (the next frame index after the references), moved to the front
with the tokens; P and N_txt keep the text positions of their own passes.

Direct denoiser calls (`VSFGuidance.direct_calls`) are supported for `QwenImagePipeline`; the Edit
pipelines need the call's image for the negative and refuse them.
"""
from __future__ import annotations

import hashlib
from math import prod

import torch

from ..attention import joint_attention
from ..state import LatentGrid
from .family import FamilyAdapter, GuidanceInputError, GuidedProcessor, attend, heads_merged
from .text import is_blank

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default


def _rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    return apply_rotary_emb_qwen(x, freqs, use_real=False)


def guided_text_freqs(txt_freqs: torch.Tensor, negative_len: int, positive_len: int) -> torch.Tensor:
    """The text rows of the model's RoPE table for `[N0, P]`: each span at the positions of its own
    pass (`m + j`, the first rows of the table), not after the other span."""
    if txt_freqs.shape[0] < negative_len + positive_len:
        raise GuidanceInputError(f"Qwen-Image text RoPE covers {txt_freqs.shape[0]} tokens, "
                                 f"the text stream has {negative_len + positive_len}")
    return torch.cat([txt_freqs[:negative_len], txt_freqs[:positive_len]], dim=0)


def image_shapes(img_shapes) -> list[tuple[int, int, int]]:
    """(frames, height, width) of the image, then of each reference, from the model's `img_shapes`
    (per sample a list of shapes, or one shape; the model reads the first sample's)."""
    first = img_shapes[0]
    if len(first) == 3 and all(isinstance(x, int) for x in first):
        return [tuple(first)]
    return [tuple(int(x) for x in shape) for shape in first]


def stream_text_freqs(txt_freqs: torch.Tensor, run) -> torch.Tensor:
    """The text rows of the RoPE table for the run's text stream: `[N0, P]` (`guided_text_freqs`) or, with
    a negative image, `[P, N_txt]`, each span at the positions of its own pass."""
    text_negative = run.negative_len - run.negative_image_len
    if run.negative_first:
        return guided_text_freqs(txt_freqs, text_negative, run.positive_len)
    if txt_freqs.shape[0] < text_negative + run.positive_len:
        raise GuidanceInputError(f"Qwen-Image text RoPE covers {txt_freqs.shape[0]} tokens, "
                                 f"the text stream has {text_negative + run.positive_len}")
    return torch.cat([txt_freqs[:run.positive_len], txt_freqs[:text_negative]], dim=0)


def negative_image_first(img_freqs: torch.Tensor, negative_image_len: int) -> torch.Tensor:
    """The image rows of the RoPE table for `[N_img, I, R]`: the model computed the negative image's rows
    last (its shape is the last entry of `img_shapes`); they move to the front with its tokens."""
    if not negative_image_len:
        return img_freqs
    return torch.cat([img_freqs[-negative_image_len:], img_freqs[:-negative_image_len]], dim=0)


class QwenImageVSFProcessor(GuidedProcessor):
    """Joint attention of one Qwen-Image double-stream block: `[text, image stream]` with the text stream
    `[N0, P]` and the image stream `[I, R]`."""

    def __init__(self, original, run, adapter: "QwenImageFamily"):
        super().__init__(original, run)
        self.adapter = adapter

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        run = self.run
        if not run.active or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 encoder_hidden_states_mask=encoder_hidden_states_mask,
                                 attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
        if attention_mask is not None:
            raise GuidanceInputError("VSF does not support an external attention_mask in Qwen-Image attention")
        if getattr(attn, "fused_projections", False):
            raise GuidanceInputError("VSF does not support fused QKV projections; call unfuse_qkv_projections()")
        text_len, stream_len = encoder_hidden_states.shape[1], hidden_states.shape[1]
        if text_len != run.text_len:
            raise GuidanceInputError(f"Qwen-Image text stream has {text_len} tokens, expected {run.text_len}")
        image_len = self.adapter.image_tokens or stream_len
        if image_len > stream_len:
            raise GuidanceInputError(f"Qwen-Image image stream has {stream_len} tokens, img_shapes say {image_len}")
        head_dim = attn.inner_dim // attn.heads

        def heads(t):
            return t.unflatten(-1, (-1, head_dim))  # [B, L, H, D]

        q, k, v = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        cq, ck, cv = (heads(proj(encoder_hidden_states)) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq = attn.norm_added_q(cq)
        if attn.norm_added_k is not None:
            ck = attn.norm_added_k(ck)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            txt_freqs = stream_text_freqs(txt_freqs, run)
            img_freqs = negative_image_first(img_freqs, run.negative_image_len)
            q, k = _rope(q, img_freqs), _rope(k, img_freqs)
            cq, ck = _rope(cq, txt_freqs), _rope(ck, txt_freqs)
        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((cq, q), (ck, k), (cv, v)))  # [B, H, L, D]
        image_len += run.negative_image_len  # [N_img, I, R]: R follows the negative image and the image
        reference = slice(text_len + image_len, text_len + stream_len) if image_len < stream_len else None
        layout = run.joint_layout(q.shape[2], text_offset=0, reference=reference,
                                  positive_mask=self._positive_mask(encoder_hidden_states_mask))
        out = heads_merged(attend(joint_attention, q, k, v, layout, run)).to(q.dtype)
        run.calls += 1
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(text_out.contiguous())

    def _positive_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The positive span of the model's text mask (the stream is `[N0, P]`), None when all real."""
        if mask is None:
            return None
        run = self.run
        text_negative = run.negative_len - run.negative_image_len
        positive = (mask[:, text_negative:] if run.negative_first else mask[:, :run.positive_len]).to(torch.bool)
        return None if bool(positive.all()) else positive


class QwenImageFamily(FamilyAdapter):
    family = "qwenimage"
    label = "Qwen-Image"
    pipeline_prefixes = ("QwenImagePipeline",)
    negative_first = True  # [N0, P, I, R]
    cfg_kwarg = "true_cfg_scale"  # a second (negative) pass when > 1 with a negative; guidance_scale is distilled

    def __init__(self):
        self.image_tokens: int | None = None  # noisy-image tokens of the running denoiser call (the rest is R)
        self._call_encoding: dict = {}  # text-encoder settings of the running pipeline call

    def matches(self, pipe) -> bool:
        return type(pipe).__name__ in self.pipeline_prefixes

    def denoisers(self, pipe):
        return [("transformer", pipe.transformer)]

    def processor_for(self, name, original, run):
        if name.startswith("transformer_blocks.") and name.endswith(".attn.processor"):
            return QwenImageVSFProcessor(original, run, self)
        return None

    # -- the pipeline call ---------------------------------------------------------------------------
    def single_pass_kwargs(self, kwargs):
        self._call_encoding = self._encoding_of_call(kwargs)
        kwargs = super().single_pass_kwargs(kwargs)
        kwargs.pop("negative_prompt_embeds_mask", None)
        kwargs["true_cfg_scale"] = 1.0
        return kwargs

    def _encoding_of_call(self, kwargs) -> dict:
        length = kwargs.get("max_sequence_length")
        return {} if length is None else {"max_sequence_length": int(length)}

    def text_encoding(self, pipe):
        return dict(self._call_encoding)

    def encode_negative(self, pipe, prompt, settings, max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH):
        if is_blank(prompt):
            return torch.zeros(0, pipe.transformer.config.joint_attention_dim)
        # One prompt: the pipeline's template, Qwen2.5-VL's last hidden state, the template tokens dropped,
        # no padding (there is no other prompt to pad to).
        embeds, _ = pipe.encode_prompt(prompt=[str(prompt)], device=pipe._execution_device,
                                       max_sequence_length=max_sequence_length)
        return embeds[0]

    # -- the denoiser call ---------------------------------------------------------------------------
    def register_step_hook(self, model, hook):
        def before_forward(module, args, kwargs):
            self.image_tokens = self._image_tokens(kwargs)
            return hook(module, args, kwargs)

        return model.register_forward_pre_hook(before_forward, with_kwargs=True)

    @staticmethod
    def _image_tokens(kwargs) -> int | None:
        shapes = kwargs.get("img_shapes")
        if not shapes:
            return None
        return prod(image_shapes(shapes)[0])

    def extend_inputs(self, kwargs, negative):
        kwargs = super().extend_inputs(kwargs, negative)  # [N0, P]
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is not None:  # the model checks its mask against the stream: N's part is N's own padding
            neg_mask = negative.mask.to(device=mask.device, dtype=mask.dtype)
            pair = (neg_mask, mask) if self.negative_first else (mask, neg_mask)
            kwargs["encoder_hidden_states_mask"] = torch.cat(pair, dim=1)
        if kwargs.get("txt_seq_lens") is not None:  # older diffusers size the text RoPE from these
            kwargs["txt_seq_lens"] = [int(n) + negative.length for n in kwargs["txt_seq_lens"]]
        return kwargs

    def latent_grid(self, model, args, kwargs):
        shapes = kwargs.get("img_shapes")
        if not shapes:
            return None
        frames, height, width = image_shapes(shapes)[0]
        return LatentGrid(frames, height, width)


class QwenImageEditFamily(QwenImageFamily):
    """`QwenImageEditPipeline`: one input image, in the text encoder's prompt and as reference latents."""

    label = "Qwen-Image-Edit"
    pipeline_prefixes = ("QwenImageEditPipeline",)
    negative_needs_call = True  # the negative's encoding holds the call's image

    def __init__(self):
        super().__init__()
        self._images = None  # the running call's condition image(s), as the pipeline gives them to Qwen2.5-VL
        self._resizer = None  # the pipeline's image processor

    def for_pipeline(self, pipe):
        self._resizer = pipe.image_processor
        return self

    def _encoding_of_call(self, kwargs) -> dict:
        image = kwargs.get("image")
        if image is None:
            self._images = None
            return {}
        self._images = self.condition_images(image)
        return {"images": _fingerprint(self._images)}

    def condition_images(self, image):
        """The image(s) as `QwenImageEditPipeline` hands them to the text encoder: resized by the pipeline's
        image processor to about 1024x1024 pixels at the first image's aspect ratio."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        first = _pil_images(image)[0]
        width, height = calculate_dimensions(1024 * 1024, first.size[0] / first.size[1])[:2]
        return self._resizer.resize(image, height, width)

    def encode_negative(self, pipe, prompt, settings, images=None):
        if is_blank(prompt):
            return torch.zeros(0, pipe.transformer.config.joint_attention_dim)
        if images is None:
            raise GuidanceInputError(f"{type(pipe).__name__} encodes the negative prompt with the input image: "
                                     "run the pipeline through the guidance (`vsf(prompt=..., image=...)`)")
        embeds, _ = pipe.encode_prompt(prompt=[str(prompt)], image=self._images, device=pipe._execution_device)
        return embeds[0]

    # -- negative images (docs/negative-images.md) ---------------------------------------------------------
    def negative_image_options(self, kwargs) -> dict:
        return {}

    def encode_negative_image(self, pipe, image):
        """`image` as `QwenImageEditPipeline` encodes its input image: packed latents [1, n, 4C]; positions:
        its `img_shapes` entry (1, h, w)."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

        from ..state import NegativeImage

        if getattr(pipe.transformer.config, "zero_cond_t", False):
            raise GuidanceInputError("negative images are not supported on Qwen-Image-Edit models with zero_cond_t")
        first = _pil_images(image)[0]
        width, height = calculate_dimensions(1024 * 1024, first.size[0] / first.size[1])[:2]
        pixels = pipe.image_processor.preprocess(pipe.image_processor.resize(first, height, width), height, width)
        vae = pipe.vae
        pixels = pixels.unsqueeze(2).to(device=next(vae.parameters()).device, dtype=vae.dtype)
        latents = pipe._encode_vae_image(image=pixels, generator=None)  # [1, C, 1, h, w]
        channels, lat_h, lat_w = latents.shape[1], latents.shape[3], latents.shape[4]
        tokens = pipe._pack_latents(latents, 1, channels, lat_h, lat_w)
        return NegativeImage(tokens, (1, lat_h // 2, lat_w // 2))

    def extend_image_inputs(self, kwargs, negative_image):
        """The image stream `[N_img, I, R]`; the negative image's shape is appended to every sample's
        `img_shapes`, so the model computes its RoPE rows as the next image (moved to the front by the
        processor, `negative_image_first`)."""
        kwargs = dict(kwargs)
        hidden, shapes = kwargs["hidden_states"], kwargs.get("img_shapes")
        if not shapes:
            raise GuidanceInputError("VSF needs Qwen-Image-Edit called with img_shapes=... for a negative image")
        tokens = negative_image.tokens.to(device=hidden.device, dtype=hidden.dtype)
        kwargs["hidden_states"] = torch.cat([tokens.expand(hidden.shape[0], -1, -1), hidden], dim=1)
        entry = tuple(negative_image.positions)
        kwargs["img_shapes"] = [[*([s] if len(s) == 3 and all(isinstance(x, int) for x in s) else list(s)), entry]
                                for s in shapes]
        return kwargs


class QwenImageEditPlusFamily(QwenImageEditFamily):
    """`QwenImageEditPlusPipeline`: several input images, each "Picture i:" in the prompt and its own
    reference latents."""

    label = "Qwen-Image-Edit-Plus"
    pipeline_prefixes = ("QwenImageEditPlusPipeline",)
    encode_negative_image = None  # negative images: not wired for several input images yet

    def condition_images(self, image):
        """The images as `QwenImageEditPlusPipeline` hands them to the text encoder: each resized by the
        pipeline's image processor to about 384x384 pixels at its own aspect ratio."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (CONDITION_IMAGE_SIZE,
                                                                                calculate_dimensions)

        out = []
        for img in _pil_images(image):
            width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, img.size[0] / img.size[1])[:2]
            out.append(self._resizer.resize(img, height, width))
        return out


def _pil_images(image) -> list:
    from PIL import Image

    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images or not all(isinstance(i, Image.Image) for i in images):
        raise GuidanceInputError("VSF needs the Qwen-Image-Edit input image(s) as PIL images")
    return images


def _fingerprint(images) -> tuple:
    """A hashable key of image content (mode, size, pixel digest per image)."""
    images = images if isinstance(images, (list, tuple)) else [images]
    return tuple((i.mode, i.size, hashlib.sha1(i.tobytes()).hexdigest()) for i in images)
