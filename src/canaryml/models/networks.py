"""Forecasting networks (architecture only; training logic lives in `forecaster.py`).

Every network maps input [B, L, 2M] (scaled values + observed mask) to quantile forecasts
[B, H, M, Q] in scaled units. Quantiles are made monotone by construction (median + cumulative
softplus offsets), so the predicted spread is always positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from canaryml.errors import ConfigError


@dataclass(frozen=True)
class NetworkSpec:
    kind: str = "lstm"  # lstm | transformer
    n_metrics: int = 14
    lookback: int = 32
    horizon: int = 4
    hidden: int = 48
    layers: int = 1
    heads: int = 4
    dropout: float = 0.0
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    # fewest history steps a forecast is made from (the rest of the lookback NaN-padded, as at a
    # canary's start); 0 = the full lookback. Training masks the front of some windows to match.
    min_history: int = 0

    def __post_init__(self) -> None:
        q = self.quantiles
        if len(q) < 3 or list(q) != sorted(q) or 0.5 not in q or not (q[0] > 0 and q[-1] < 1):
            raise ConfigError(
                f"forecaster.quantiles={list(q)}: need ≥3 increasing values in (0,1) including 0.5"
            )
        if not 0 <= self.min_history <= self.lookback:
            raise ConfigError(f"forecaster.min_history={self.min_history} must be in "
                              f"[0, lookback={self.lookback}] (0 = the full lookback)")
        if self.lookback < 2 or self.horizon < 1:
            raise ConfigError(
                f"forecaster lookback={self.lookback}, horizon={self.horizon}: need lookback ≥ 2, "
                "horizon ≥ 1"
            )


class QuantileHead(nn.Module):
    def __init__(self, d_in: int, horizon: int, n_metrics: int, n_q: int, median_index: int):
        super().__init__()
        self.h, self.m, self.q, self.mid = horizon, n_metrics, n_q, median_index
        self.proj = nn.Linear(d_in, horizon * n_metrics * n_q)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        # one small GEMM per row (baddbmm over the expanded weight) instead of `self.proj(feat)`:
        # a plain Linear picks its kernel by batch size, so a window's forecast would change in
        # the last bits with the batch it is scored in; this way a tick scored in one batch
        # equals each deployment scored alone (same weights, same state dict)
        b = feat.shape[0]
        raw = torch.baddbmm(self.proj.bias.expand(b, 1, -1), feat.unsqueeze(1),
                            self.proj.weight.t().expand(b, -1, -1))
        raw = raw.view(-1, self.h, self.m, self.q)
        med = raw[..., self.mid: self.mid + 1]
        lo = nn.functional.softplus(raw[..., : self.mid]).flip(-1).cumsum(-1).flip(-1)
        hi = nn.functional.softplus(raw[..., self.mid + 1:]).cumsum(-1)
        return torch.cat([med - lo, med, med + hi], dim=-1)


class LSTMNet(nn.Module):
    def __init__(self, spec: NetworkSpec):
        super().__init__()
        self.spec = spec
        # time-major inside (batch_first is not part of the state dict): the CPU (oneDNN) LSTM
        # runs on a contiguous [L, B, F] input without a transpose copy; `forward` takes either
        self.lstm = nn.LSTM(2 * spec.n_metrics, spec.hidden, num_layers=spec.layers,
                            batch_first=False, dropout=spec.dropout if spec.layers > 1 else 0.0)
        self.head = QuantileHead(spec.hidden, spec.horizon, spec.n_metrics, len(spec.quantiles),
                                 spec.quantiles.index(0.5))

    def forward(self, x: torch.Tensor, *, time_major: bool = False) -> torch.Tensor:
        """x [B, L, 2M] (or [L, B, 2M] with `time_major`, the scorer's inference layout) →
        [B, H, M, Q]. Both layouts give bit-identical outputs."""
        out, _ = self.lstm(x if time_major else x.transpose(0, 1))
        # last observed value as a skip connection: the net predicts the change
        last = (x[-1] if time_major else x[:, -1])[:, : self.spec.n_metrics]
        return self.head(out[-1]) + last.unsqueeze(1).unsqueeze(-1)


class TransformerNet(nn.Module):
    def __init__(self, spec: NetworkSpec):
        super().__init__()
        if spec.hidden % spec.heads:
            raise ConfigError(
                f"forecaster.hidden={spec.hidden} must be divisible by forecaster.heads={spec.heads}"
            )
        self.spec = spec
        self.embed = nn.Linear(2 * spec.n_metrics, spec.hidden)
        pos = torch.arange(spec.lookback).unsqueeze(1)
        div = torch.exp(torch.arange(0, spec.hidden, 2) * (-math.log(10000.0) / spec.hidden))
        pe = torch.zeros(spec.lookback, spec.hidden)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)[:, : spec.hidden // 2]
        self.pe: torch.Tensor
        self.register_buffer("pe", pe.unsqueeze(0))
        layer = nn.TransformerEncoderLayer(spec.hidden, spec.heads, dim_feedforward=2 * spec.hidden,
                                           dropout=spec.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.head = QuantileHead(spec.hidden, spec.horizon, spec.n_metrics, len(spec.quantiles),
                                 spec.quantiles.index(0.5))

    def forward(self, x: torch.Tensor, *, time_major: bool = False) -> torch.Tensor:
        if time_major:
            x = x.transpose(0, 1)
        h = self.encoder(self.embed(x) + self.pe[:, -x.shape[1]:])
        last = x[:, -1, : self.spec.n_metrics].unsqueeze(1).unsqueeze(-1)
        return self.head(h[:, -1]) + last


def build_network(spec: NetworkSpec) -> nn.Module:
    if spec.kind == "lstm":
        return LSTMNet(spec)
    if spec.kind == "transformer":
        return TransformerNet(spec)
    raise ConfigError(f"forecaster.kind={spec.kind!r} is unknown; use lstm or transformer")
