"""Channel scoring: common act^2 per FFN channel, the fused kernel path and the plain hook path.

`ChannelScorer` is a context manager a user's own calibration loop runs under; `score_channels` drives it
over a tensor of token ids, batch by batch, running only the decoder (no LM head, no logits).
"""
from __future__ import annotations

import types

import torch
from torch import nn
from tqdm.auto import tqdm

import compact_kernels as ck
from compact_kernels import reference

from . import models

BACKENDS = ("auto", "fused", "hooks")
_ABSENT = object()


def keep_table(vocab_size: int, keep_token_ids, device=None) -> torch.Tensor:
    """float32 [vocab] with 1 at the kept ids, 0 elsewhere."""
    table = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    table[torch.as_tensor(list(keep_token_ids), dtype=torch.long, device=device)] = 1.0
    return table


class ChannelScorer:
    """Accumulates common act^2 for every MLP while the model runs; restores the model exactly on exit.

        with ChannelScorer(model, keep_token_ids=kept) as s, torch.no_grad():
            for batch in loader:
                model(**batch)
        s.scores  # {"model.layers.{i}.mlp": float64 [I]}

    A position's weight is table[input_id] (1 for ids in `keep_token_ids`, 0 otherwise; or any float
    `token_weights` table of vocabulary size) times its attention mask; all ones when neither is given.
    backend "fused" (= "auto") replaces each MLP's act-and-mul by `glu_and_score`; "hooks" is the plain
    forward-pre-hook path on `down_proj`, the reference the fused path is checked against.
    `plain=True` also accumulates unweighted act^2 (attention mask only) in `plain_scores`, in the same pass.
    """

    def __init__(self, model: nn.Module, *, keep_token_ids=None, token_weights=None, backend: str = "auto",
                 plain: bool = False):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if keep_token_ids is not None and token_weights is not None:
            raise ValueError("give keep_token_ids or token_weights, not both")
        self.model = model
        self.family = models.family_of(model.config)
        self.activation = models.activation_of(model.config)
        self.backend = "fused" if backend == "auto" else backend
        self.mlps = models.mlps(model)
        embedding = model.get_input_embeddings()
        device, vocab = embedding.weight.device, embedding.num_embeddings
        self.table = None
        if keep_token_ids is not None:
            self.table = keep_table(vocab, keep_token_ids, device)
        elif token_weights is not None:
            self.table = torch.as_tensor(token_weights, dtype=torch.float32, device=device)
            if self.table.shape != (vocab,):
                raise ValueError(f"token_weights must have shape ({vocab},), got {tuple(self.table.shape)}")
        size = models.intermediate_size(model)
        self.scores = {name: torch.zeros(size, dtype=torch.float64, device=device) for name in self.mlps}
        self.plain_scores = {name: torch.zeros_like(s) for name, s in self.scores.items()} if plain else None
        self._mass = torch.zeros((), dtype=torch.float64, device=device)
        self._weights: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._undo: list = []

    @property
    def tokens(self) -> float:
        """Sum of the token weights seen so far: the calibration mass behind the scores."""
        return float(self._mass)

    def set_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Token weights for the next forward; the decoder pre-hook calls it (call it yourself with inputs_embeds)."""
        self._mask = None if attention_mask is None else attention_mask.to(torch.float32)
        if self.table is None:
            self._weights = self._mask
        else:
            self._weights = ck.token_weights(input_ids, self.table, attention_mask)
        self._mass += input_ids.numel() if self._weights is None else self._weights.sum(dtype=torch.float64)

    def _decoder_pre_hook(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if input_ids is not None:
            self.set_batch(input_ids, mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)
        elif self._weights is None and self.table is not None:
            raise ValueError("ChannelScorer needs input_ids in the forward call (or set_batch before each forward)")

    def _fused_forward(self, name: str):
        family, activation, scorer = self.family, self.activation, self

        def forward(mlp, x):
            gate, up = models.gate_up(mlp, family, x)
            scores = scorer.scores[name]
            if torch.is_grad_enabled() and gate.requires_grad:  # keep autograd intact: plain ops, detached score
                h = reference.glu_and_score(gate, up, activation=activation)
                reference.channel_scores(h.detach(), scorer._weights, out=scores)
            else:
                h = ck.glu_and_score(gate, up, activation=activation, weights=scorer._weights, scores=scores)
            if scorer.plain_scores is not None:
                ck.channel_scores(h.detach(), scorer._mask, out=scorer.plain_scores[name])
            return mlp.down_proj(h)

        return forward

    def _down_pre_hook(self, name: str):
        def hook(module, args):
            reference.channel_scores(args[0].detach(), self._weights, out=self.scores[name])
            if self.plain_scores is not None:
                reference.channel_scores(args[0].detach(), self._mask, out=self.plain_scores[name])

        return hook

    def _patch_forward(self, mlp: nn.Module, forward) -> None:
        saved = mlp.__dict__.get("forward", _ABSENT)
        mlp.forward = types.MethodType(forward, mlp)
        self._undo.append(lambda: delattr(mlp, "forward") if saved is _ABSENT else setattr(mlp, "forward", saved))

    def __enter__(self) -> "ChannelScorer":
        decoder = models.decoder_of(self.model)
        self._undo.append(decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True).remove)
        for name, mlp in self.mlps.items():
            if self.backend == "hooks":
                self._undo.append(mlp.down_proj.register_forward_pre_hook(self._down_pre_hook(name)).remove)
            else:
                self._patch_forward(mlp, self._fused_forward(name))
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()
        self._weights = self._mask = None


def run_scorer(scorer: ChannelScorer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               batch_size: int = 1, progress: bool | None = None, start_batch: int = 0,
               on_batch=None) -> ChannelScorer:
    """Feed the sequences through the decoder only (no LM head), batch by batch, under `scorer`, from batch
    `start_batch` on; `on_batch(batches_done)` runs after each batch (checkpoints hook in there)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [sequences, length], got shape {tuple(input_ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    decoder = models.decoder_of(scorer.model)
    device = scorer.model.get_input_embeddings().weight.device
    total = -(-input_ids.shape[0] // batch_size)
    with scorer, torch.inference_mode():
        for batch in tqdm(range(start_batch, total), desc="scoring", unit="batch", initial=start_batch, total=total,
                          disable=None if progress is None else not progress):
            rows = slice(batch * batch_size, (batch + 1) * batch_size)
            ids = input_ids[rows].to(device)
            mask = None if attention_mask is None else attention_mask[rows].to(device)
            decoder(input_ids=ids, attention_mask=mask, use_cache=False)
            if on_batch is not None:
                on_batch(batch + 1)
    return scorer


def score_channels(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   keep_token_ids=None, token_weights=None, batch_size: int = 1, backend: str = "auto",
                   progress: bool | None = None) -> dict[str, torch.Tensor]:
    """{"model.layers.{i}.mlp": float64 [I]}: common act^2 over all sequences, running the decoder only."""
    scorer = ChannelScorer(model, keep_token_ids=keep_token_ids, token_weights=token_weights, backend=backend)
    return run_scorer(scorer, input_ids, attention_mask, batch_size=batch_size, progress=progress).scores
