"""Token Dictionary Learning (paper section 3.3): two token dictionaries, updated once per pair
from the reference and read by every output position through cross-attention."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Dictionaries:
    """Per-pair dictionaries, projected for the learning phase: keys [B,N,d], values [B,N,C]."""

    keys: torch.Tensor
    values: torch.Tensor


class TokenDictionary(nn.Module):
    def __init__(self, channels: int, tokens: int = 128, dim: int = 64):
        super().__init__()
        self.dim = dim
        self.d_lrc = nn.Parameter(torch.randn(tokens, dim))
        self.d_ref = nn.Parameter(torch.randn(tokens, dim))
        self.s_logit = nn.Parameter(torch.zeros(1))  # s = sigmoid(.) in (0, 1)
        # update phase
        self.q_up = nn.Linear(dim, dim)
        self.k_up = nn.Linear(channels, dim)
        self.v_up_lrc = nn.Linear(channels, dim)
        self.v_up_ref = nn.Linear(channels, dim)
        # learning phase
        self.q_learn = nn.Linear(channels, dim)
        self.k_learn = nn.Linear(dim, dim)
        self.v_learn = nn.Linear(dim, channels)

    def update(self, f_lrc: torch.Tensor, f_ref: torch.Tensor, attention) -> Dictionaries:
        """f_lrc, f_ref [B,C,H,W] on the Ref grid -> updated, projected dictionaries."""
        scale = 1.0 / math.sqrt(self.dim)
        q = self.q_up(self.d_lrc)  # [N,d]
        learned = []
        for i in range(f_lrc.shape[0]):
            k, v = self._update_keys_values(f_lrc[i], f_ref[i])
            learned.append(self._learned_from(attention(q, k, v, scale)))  # [N,2d]
        return Dictionaries(*(torch.stack(t) for t in zip(*learned, strict=True)))

    def partial_update(self, f_lrc: torch.Tensor, f_ref: torch.Tensor, attention):
        """`update`'s attention over some of the positions only (a band of rows): per batch item
        (its result [N,2d], the log-sum-exp of its scores [N]), for `finish_update` to merge with
        the other bands' so that no map of every position needs to exist at once."""
        scale = 1.0 / math.sqrt(self.dim)
        q = self.q_up(self.d_lrc)
        parts = []
        for i in range(f_lrc.shape[0]):
            k, v = self._update_keys_values(f_lrc[i], f_ref[i])
            lse = torch.logsumexp((q.float() @ k.float().t()) * scale, dim=1)
            parts.append((attention(q, k, v, scale).float(), lse))
        return parts

    def finish_update(self, bands: list) -> Dictionaries:
        """The dictionaries from every band's `partial_update`: each band's attention result
        weighted by its share of the softmax's normaliser, which is `update` (to rounding)."""
        learned = []
        for i in range(len(bands[0])):
            outs = torch.stack([band[i][0] for band in bands])  # [bands, N, 2d]
            lse = torch.stack([band[i][1] for band in bands])  # [bands, N]
            weight = torch.softmax(lse, dim=0).unsqueeze(-1)
            learned.append(self._learned_from((weight * outs).sum(0).to(self.d_lrc.dtype)))
        return Dictionaries(*(torch.stack(t) for t in zip(*learned, strict=True)))

    def _update_keys_values(self, f_lrc: torch.Tensor, f_ref: torch.Tensor):
        """The update phase's keys [P,d] and values [P,2d] of one image's positions."""
        lrc_tokens = f_lrc.flatten(1).t()  # [P,C]
        # One attention pass over the positions gives both updates: V = [V_LRC | V_Ref].
        v = torch.cat([self.v_up_lrc(lrc_tokens), self.v_up_ref(f_ref.flatten(1).t())], dim=1)
        return self.k_up(lrc_tokens), v

    def _learned_from(self, upd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The learning phase's keys and values from the update's attention result [N,2d]."""
        s = torch.sigmoid(self.s_logit)
        d_lrc = s * self.d_lrc + (1 - s) * upd[:, : self.dim]
        d_ref = s * self.d_ref + (1 - s) * upd[:, self.dim :]
        return self.k_learn(d_lrc), self.v_learn(d_ref)

    def learned(self, batch: int = 1) -> Dictionaries:
        """The dictionaries as trained, without a per-pair update (the reference switched off)."""
        keys = self.k_learn(self.d_lrc).expand(batch, -1, -1)
        return Dictionaries(keys, self.v_learn(self.d_ref).expand(batch, -1, -1))

    def learn(self, f_lr: torch.Tensor, dicts: Dictionaries, attention) -> torch.Tensor:
        """F_Dict = softmax(Q_L K_L^T / sqrt d) V_L for every position of f_lr [B,C,H,W]."""
        b, c, h, w = f_lr.shape
        scale = 1.0 / math.sqrt(self.dim)
        out = []
        for i in range(b):
            q = self.q_learn(f_lr[i].flatten(1).t())  # [HW,d]
            out.append(attention(q, dicts.keys[i], dicts.values[i], scale).t().reshape(c, h, w))
        return torch.stack(out)
