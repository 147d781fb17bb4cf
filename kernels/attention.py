"""Single-head attention for token dictionary learning: out = softmax(q k^T * scale) v.

Contract. q [Nq, d], k [Nk, d], v [Nk, c], one float dtype (fp16, bf16, fp32); scale a Python
float; out [Nq, c] in q's dtype. Softmax statistics and both products accumulate in fp32.

Two regimes, picked by shape in the launcher:
- many queries vs a few keys (TDL reads 128 dictionary tokens): one program per query block walks
  all keys with an online softmax (flash attention, one split);
- few queries vs millions of keys (TDL's update phase): the keys are split across programs, each
  writes its partial (row max m, sum of exp l, unnormalised acc), and a combine step rescales:
  out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s (flash-decoding).
"""

from __future__ import annotations

import torch

from ._launch import dot_ieee, launch_config, next_pow2, require_triton, tl, triton

__all__ = ["attention", "attention_reference"]

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_REF_CHUNK_ELEMS = 1 << 24
_LOG2E = 1.4426950408889634


def _check(q, k, v, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype not in _FLOAT:
            raise ValueError(
                f"attention: {name} must be a 2-D float tensor, got "
                f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}"
            )
    if q.shape[1] != k.shape[1] or k.shape[0] != v.shape[0]:
        raise ValueError(
            f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "do not fit q [Nq, d], k [Nk, d], v [Nk, c]"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: devices differ: {q.device}, {k.device}, {v.device}")
    if k.shape[0] == 0:
        raise ValueError("attention: needs at least one key")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"attention: scale must be a Python number, got {type(scale)}")


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain PyTorch spec: softmax(q k^T scale) v in fp32 over query chunks, cast to q's dtype."""
    _check(q, k, v, scale)
    kf, vf = k.float(), v.float()
    out = torch.empty(q.shape[0], v.shape[1], dtype=torch.float32, device=q.device)
    step = max(1, _REF_CHUNK_ELEMS // k.shape[0])
    for q0 in range(0, q.shape[0], step):
        s = (q[q0 : q0 + step].float() @ kf.t()) * scale
        out[q0 : q0 + step] = torch.softmax(s, dim=1) @ vf
    return out.to(q.dtype)


@triton.jit
def _attn_kernel(
    out_ptr, m_ptr, l_ptr,
    q_ptr, stride_q,
    k_ptr, stride_k,
    v_ptr, stride_v,
    NQ, NK, D, CV, KEYS_PER_SPLIT, qk_scale,
    SPLIT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Online softmax over keys [split*KEYS_PER_SPLIT, +KEYS_PER_SPLIT) for one query block.

    SPLIT=False: out = acc / l (final, q's dtype). SPLIT=True: out[split] = acc, m, l in fp32
    (m in log2 units since qk_scale carries log2(e)).
    """
    # -- map the program to (query block, key split) --------------------------------------------
    pid_q = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, BLOCK_C)
    mask_q = offs_q < NQ
    mask_d = offs_d < D
    mask_c = offs_c < CV
    q = tl.load(
        q_ptr + offs_q[:, None] * stride_q + offs_d[None, :],
        mask=mask_q[:, None] & mask_d[None, :], other=0.0,
    )  # fmt: skip
    k_lo = pid_s * KEYS_PER_SPLIT
    k_hi = tl.minimum(k_lo + KEYS_PER_SPLIT, NK)

    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_C], tl.float32)

    # -- loop over key blocks (every split holds >= 1 key, so m_i is finite after block 0) -------
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < k_hi
        kt = tl.load(
            k_ptr + offs_k[None, :] * stride_k + offs_d[:, None],
            mask=mask_k[None, :] & mask_d[:, None], other=0.0,
        )  # fmt: skip
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where(mask_k[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + offs_k[:, None] * stride_v + offs_c[None, :],
            mask=mask_k[:, None] & mask_c[None, :], other=0.0,
        )  # fmt: skip
        if IEEE:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new

    # -- write back -------------------------------------------------------------------------------
    if SPLIT:
        row = pid_s * NQ + offs_q
        tl.store(m_ptr + row, m_i, mask=mask_q)
        tl.store(l_ptr + row, l_i, mask=mask_q)
        tl.store(
            out_ptr + row[:, None] * CV + offs_c[None, :], acc,
            mask=mask_q[:, None] & mask_c[None, :],
        )  # fmt: skip
    else:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + offs_q[:, None] * CV + offs_c[None, :], out.to(out_ptr.dtype.element_ty),
            mask=mask_q[:, None] & mask_c[None, :],
        )  # fmt: skip


def _num_splits(nq_blocks: int, nk: int, block_k: int, device: torch.device) -> int:
    """Enough key splits to fill the device when the query blocks alone cannot."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8  # interpreter: only exercises the split path
    if nq_blocks >= target:
        return 1
    max_splits = max(1, -(-nk // (4 * block_k)))  # at least 4 key blocks per split
    return max(1, min(-(-target // nq_blocks), max_splits))


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_splits: int | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale) v: [Nq, c] in q's dtype. `num_splits` overrides the regime choice."""
    _check(q, k, v, scale)
    require_triton(q, k, v)
    nq, d = q.shape
    nk, cv = v.shape
    out = torch.empty(nq, cv, dtype=q.dtype, device=q.device)
    if nq == 0 or cv == 0:
        return out
    q, k, v = (t if t.stride(1) == 1 else t.contiguous() for t in (q, k, v))
    cfg = launch_config("attention", q.dtype)
    bq, bk = cfg.blocks["BLOCK_Q"], cfg.blocks["BLOCK_K"]
    bd, bc = max(16, next_pow2(d)), max(16, next_pow2(cv))
    nqb = triton.cdiv(nq, bq)
    splits = num_splits if num_splits is not None else _num_splits(nqb, nk, bk, q.device)
    if splits < 1:
        raise ValueError(f"attention: num_splits must be >= 1, got {splits}")
    keys_per_split = triton.cdiv(triton.cdiv(nk, splits), bk) * bk
    splits = triton.cdiv(nk, keys_per_split)  # every split non-empty
    qk_scale = float(scale) * _LOG2E
    common = dict(
        IEEE=dot_ieee(q.dtype), BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=bd, BLOCK_C=bc,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if splits == 1:
        _attn_kernel[(nqb, 1)](
            out, out, out, q, q.stride(0), k, k.stride(0), v, v.stride(0),
            nq, nk, d, cv, keys_per_split, qk_scale, SPLIT=False, **common,
        )  # fmt: skip
        return out
    acc = torch.empty(splits, nq, cv, dtype=torch.float32, device=q.device)
    m = torch.empty(splits, nq, dtype=torch.float32, device=q.device)
    lsum = torch.empty(splits, nq, dtype=torch.float32, device=q.device)
    _attn_kernel[(nqb, splits)](
        acc, m, lsum, q, q.stride(0), k, k.stride(0), v, v.stride(0),
        nq, nk, d, cv, keys_per_split, qk_scale, SPLIT=True, **common,
    )  # fmt: skip
    # combine: [splits, Nq, c] is tiny next to the keys, so plain torch does it
    w = torch.exp2(m - m.amax(dim=0, keepdim=True))
    res = (w[..., None] * acc).sum(0) / (w * lsum).sum(0)[:, None]
    return res.to(q.dtype)
