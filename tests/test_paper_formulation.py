"""The whole SD3 transformer under VSFGuidance equals the paper's own formulation (Listing 1):
the negative appended to the prompt (N0), a duplicated key/value group N1 with values * -alpha, and a
dense additive mask over [I, P, N0, N1] with -beta on image->N1 — written here independently of lib_vsf.
"""
import torch
import torch.nn.functional as F

from lib_vsf import from_preset
from lib_vsf.diffusers import VSFGuidance
from tiny_pipelines import sd3_pipeline


class PaperDenseProcessor:
    """Paper Listing 1 for diffusers' image-first order [I, P, N0] (+ N1 appended as keys only)."""

    def __init__(self, neg_len, alpha, beta):
        self.n, self.alpha, self.beta = neg_len, alpha, beta

    def mask(self, img_len, txt_len):
        n, pos_len = self.n, txt_len - self.n
        total = img_len + txt_len
        m = torch.zeros(total, total + n, dtype=torch.float64)
        m[img_len:, -n:] = float("-inf")                                # P and N0 do not see N1
        m[:img_len + pos_len, img_len + pos_len:total] = float("-inf")  # I and P do not see N0
        m[img_len + pos_len:, img_len:img_len + pos_len] = float("-inf")  # N0 does not see P
        m[:img_len, -n:] -= self.beta                                   # bias image -> N1
        return m

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b = hidden_states.shape[0]

        def heads(t):
            return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2).double()

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        q, k = attn.norm_q(q) if attn.norm_q else q, attn.norm_k(k) if attn.norm_k else k
        if encoder_hidden_states is None:  # image-only attention: unchanged
            o = F.scaled_dot_product_attention(q, k, v)
            return attn.to_out[0](o.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).float())
        eq, ek, ev = (heads(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        eq = attn.norm_added_q(eq) if attn.norm_added_q else eq
        ek = attn.norm_added_k(ek) if attn.norm_added_k else ek
        img_len = hidden_states.shape[1]
        q = torch.cat([q, eq], 2)
        k = torch.cat([k, ek, ek[:, :, -self.n:]], 2)
        v = torch.cat([v, ev, -self.alpha * ev[:, :, -self.n:]], 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(img_len, eq.shape[2]))
        o = o.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).float()
        o, eo = o[:, :img_len], o[:, img_len:]
        eo = None if attn.context_pre_only else attn.to_add_out(eo)
        return attn.to_out[1](attn.to_out[0](o)), eo


def test_sd3_transformer_matches_the_paper_dense_mask_formulation():
    pipe = sd3_pipeline(seed=3, dual_attention=True)
    transformer = pipe.transformer
    settings = from_preset("VSF Strong")
    torch.manual_seed(0)
    x = torch.randn(1, 4, 8, 8)
    prompt = torch.randn(1, 12, 32)
    negative = torch.randn(1, 5, 32)
    pooled = torch.randn(1, 64)
    t = torch.tensor([500.0])

    def forward(context):
        with torch.no_grad():
            return transformer(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                               timestep=t, return_dict=False)[0]

    originals = dict(transformer.attn_processors)
    dense = {name: PaperDenseProcessor(5, settings.alpha, settings.beta) for name in originals}
    transformer.set_attn_processor(dense)
    try:
        want = forward(torch.cat([prompt, negative], 1))
    finally:
        transformer.set_attn_processor(dict(originals))

    guidance = VSFGuidance(pipe, "unused", settings)
    with guidance:
        # feed our own negative embedding instead of the encoded prompt, then run one step
        from lib_vsf.state import NegativeText

        guidance.negative = NegativeText.from_sequences([negative[0]])
        with guidance.direct_calls(step=0, total=1):
            got = forward(prompt)
        assert guidance.run.calls == 2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.equal(got, forward(prompt)), "guidance had no effect"
