"""Forecaster LightningModule: an injected network trained with a masked pinball loss."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader

from canaryml.models.windows import WindowDataset

log = logging.getLogger(__name__)


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean quantile loss over observed targets. pred [B,H,M,Q], target [B,H,M] (NaN = gap)."""
    obs = torch.isfinite(target)
    y = torch.where(obs, target, torch.zeros_like(target)).unsqueeze(-1)
    diff = y - pred
    loss = torch.maximum(quantiles * diff, (quantiles - 1) * diff).mean(-1)
    n = obs.sum().clamp_min(1)
    return (loss * obs).sum() / n


class Forecaster(pl.LightningModule):
    """Trains `net` (input [B,L,2M] → quantiles [B,H,M,Q]) on healthy windows."""

    def __init__(self, net: nn.Module, quantiles: tuple[float, ...], lr: float = 3e-3):
        super().__init__()
        self.net = net
        self.lr = lr
        self.q: torch.Tensor
        self.register_buffer("q", torch.tensor(quantiles, dtype=torch.float32))
        self.history: list[dict[str, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return pinball_loss(self.net(x), y, self.q)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._step(batch), on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        m = self.trainer.callback_metrics
        self.history.append({k: float(v) for k, v in m.items() if k in ("train/loss", "val/loss")}
                            | {"epoch": float(self.current_epoch)})

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def fit_forecaster(module: Forecaster, train: WindowDataset, val: WindowDataset | None, *,
                   max_epochs: int, batch_size: int, patience: int, work_dir: Path,
                   accelerator: str = "auto", devices: int = 1, progress_bar: bool = True,
                   seed: int = 0, callbacks: Sequence[pl.Callback] = (),
                   logger: Logger | None = None
                   ) -> tuple[Forecaster, list[dict[str, float]], float]:
    """Fit with early stopping + checkpointing (best val/loss restored). Returns the module on
    CPU in eval mode, its per-epoch history and the mean seconds per epoch. Extra Lightning
    `callbacks` (e.g. an Optuna pruning callback) run after the built-in ones; `logger` receives
    the curves during the fit (e.g. `canaryml.tracking.lightning_logger()`; default a CSV file
    in `work_dir`)."""
    import time

    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    pl.seed_everything(seed, workers=True, verbose=False)
    train_dl = DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=0)
    val_dl = DataLoader(val, batch_size=batch_size * 4, num_workers=0) if val is not None and len(val) else None
    monitor = "val/loss" if val_dl is not None else "train/loss"
    ckpt = ModelCheckpoint(dirpath=work_dir / "checkpoints", monitor=monitor, mode="min",
                           save_top_k=1, filename="best")
    all_callbacks: list[pl.Callback] = [
        ckpt, EarlyStopping(monitor=monitor, patience=patience, mode="min"), *callbacks]
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator=accelerator, devices=devices,
                         callbacks=all_callbacks,
                         logger=logger or CSVLogger(str(work_dir), name="lightning"),
                         enable_progress_bar=progress_bar, enable_model_summary=False,
                         default_root_dir=str(work_dir), num_sanity_val_steps=0,
                         # ≤ the batches of one epoch: Lightning warns on every small fit else
                         log_every_n_steps=max(1, min(10, len(train_dl))))
    t0 = time.perf_counter()
    trainer.fit(module, train_dl, val_dl)
    epochs = max(trainer.current_epoch, 1)
    sec_per_epoch = (time.perf_counter() - t0) / epochs
    if val_dl is None:
        # without validation the epoch-end hook did not record; keep the train curve
        module.history = [{"epoch": float(epochs - 1),
                           "train/loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}]
    history = list(module.history)
    if ckpt.best_model_path:
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
    module = module.cpu().eval()
    return module, history, sec_per_epoch
