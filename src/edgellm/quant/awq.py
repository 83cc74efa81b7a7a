"""AWQ (Lin et al. 2023), as AutoAWQ runs it, on our fused layout, one decoder layer at a time.

Per layer:
1. Run the float layer over all calibration sequences (bf16 compute), recording the mean |input| of every
   linear, the full inputs of a fixed subset of `search_samples` sequences, and the layer's outputs, which
   are the next layer's inputs (computed before this layer is touched, as AutoAWQ does).
2. Scale search, four groups: input_layernorm -> qkv, v rows -> o_proj (only when shapes allow, i.e. no GQA),
   post_attention_layernorm -> gate_up, up rows -> down_proj. For ratio r on a 20-point grid,
   s = x_mean^r / w_mean^(1-r) (AutoAWQ's "duo scaling"), normalised; the loss is the MSE of the group's
   block output (self_attn, o_proj, mlp, down_proj) with the group's linears fake-quantized as Q(W*s)/s.
   The best s is folded into the previous op (norm weight or linear rows) and the linears' columns,
   which leaves the float function unchanged.
3. Clip search: per output channel and group, the max |w| among 10 shrink steps (of a 20-point grid down
   to 0.5) that minimises the group's partial output error on 512 tokens. q/k rows are not clipped (their
   errors are amplified by the softmax), as in llm-awq/AutoAWQ.
Results of finished layers are cached on disk; a rerun with the same model, data and settings resumes at
the first unfinished layer (inputs are recomputed by rerunning the cheap float forward of earlier layers).
AWQ+ adds one more group after the last layer: final norm -> lm_head (see `_lm_head`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu
from ..model import DecoderLayer, Transformer
from .convert import ScaledLinear
from .pergroup import fake_quantize, fake_quantize_groups, grouped
from .spec import QuantSpec


@dataclass
class AWQOptions:
    n_grid: int = 20              # scale-search grid: ratio = i / n_grid, i = 0..n_grid-1
    duo_scaling: bool = True      # AutoAWQ's default: weigh activation and weight magnitudes
    search_samples: int = 16      # calibration sequences used for the search losses (statistics use all)
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    lm_head_search: bool = True   # AWQ+: also search norm -> lm_head scales and lm_head clipping
    head_samples: int = 2         # sequences whose logits score the lm_head search
    batch: int = 8                # sequences per forward batch
    compute_dtype: str = "auto"   # block forward passes (auto: bf16 with native bf16, else fp32, as --dtype auto);
    #                               weights and searches stay fp32


@dataclass
class LayerResult:
    scales: dict[str, torch.Tensor] = field(default_factory=dict)   # group name -> (in_features,) scale
    clips: dict[str, torch.Tensor] = field(default_factory=dict)    # target -> (rows, n_groups) max |w|
    losses: dict[str, float] = field(default_factory=dict)          # group -> best loss / loss at s = 1

    def to_dict(self) -> dict:
        return {"scales": self.scales, "clips": self.clips, "losses": self.losses}

    @classmethod
    def from_dict(cls, d: dict) -> LayerResult:
        return cls(d["scales"], d["clips"], d.get("losses", {}))


ProgressFn = Callable[[int, int, float, float], None]  # (layer index, n layers, seconds, eta seconds)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.1f}s"


def _mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    # Subtract in the compute dtype (close values subtract exactly), square in fp32.
    return float((out - ref).float().pow_(2).mean())


class _Capture:
    """Forward pre-hook on a linear: sums |x| per channel over all tokens; keeps inputs of the first sequences."""

    def __init__(self, keep_sequences: int) -> None:
        self.abs_sum: torch.Tensor | None = None
        self.tokens = 0
        self.keep = keep_sequences
        self.kept: list[torch.Tensor] = []
        self.n_kept = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        flat = x.reshape(-1, x.shape[-1])
        s = flat.float().abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.tokens += flat.shape[0]
        if self.n_kept < self.keep:
            take = x[: self.keep - self.n_kept]
            self.kept.append(take.detach().clone())
            self.n_kept += take.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.abs_sum / self.tokens

    @property
    def inputs(self) -> torch.Tensor:
        return torch.cat(self.kept)


class AWQ:
    def __init__(self, model: Transformer, spec: QuantSpec, options: AWQOptions | None = None,
                 cache_dir: Path | None = None, log: Callable[[str], None] = _log,
                 progress: ProgressFn | None = None) -> None:
        self.model, self.spec = model, spec
        self.opt = options or AWQOptions()
        compute = cpu.auto_dtype() if self.opt.compute_dtype == "auto" else self.opt.compute_dtype
        self.cdtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[compute]
        self.cache_dir = cache_dir
        self.log, self.progress = log, progress
        cfg = model.config
        self.q_size, self.kv_size, self.inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size

    # ------------------------------------------------------------------ driver
    def run(self, calib_ids: torch.Tensor) -> list[LayerResult]:
        """Search and apply scales/clips to every layer of the (fp32) model, in place."""
        model = self.model
        t = calib_ids.shape[1]
        cache = self._cache_folder(calib_ids)
        model.init_rope(max(t, model.config.max_seq_len))
        self.cos, self.sin = model.rope_cos[:t], model.rope_sin[:t]
        with torch.inference_mode():
            x = model.embed_tokens(calib_ids).to(self.cdtype)
        results: list[LayerResult] = []
        n_layers = len(model.layers)
        t_start = time.perf_counter()
        for i, layer in enumerate(model.layers):
            t0, c0 = time.perf_counter(), time.process_time()
            cached = cache / f"layer_{i:03d}.pt" if cache else None
            if cached is not None and cached.is_file():
                res = LayerResult.from_dict(torch.load(cached, weights_only=True))
                with torch.inference_mode():
                    x = self._forward_all(layer, x, [])
                self._apply_scales(layer, res.scales)
                self._apply_clips(layer, res.clips)
                self.log(f"AWQ layer {i + 1}/{n_layers}: resumed from {cached}")
            else:
                res, x = self._layer(layer, x)
                if cached is not None:
                    tmp = cached.with_suffix(".tmp")
                    torch.save(res.to_dict(), tmp)
                    tmp.replace(cached)  # atomic: an interrupted save never looks finished
                gain = ", ".join(f"{k} {v:.2f}" for k, v in res.losses.items())
                self.log(f"AWQ layer {i + 1}/{n_layers} done in {_fmt_s(time.perf_counter() - t0)} "
                         f"(cpu {_fmt_s(time.process_time() - c0)}; search loss / RTN loss: {gain}); "
                         f"ETA {_fmt_s(self._eta(t_start, i, n_layers))}")
            results.append(res)
            dt = time.perf_counter() - t0
            eta = self._eta(t_start, i, n_layers)
            if self.progress is not None:
                self.progress(i, n_layers, dt, eta)
        if self.spec.algorithm == "awqplus" and self.opt.lm_head_search:
            cached = cache / f"lm_head_{self.opt.head_samples}.pt" if cache else None
            t0 = time.perf_counter()
            if cached is not None and cached.is_file():
                res = LayerResult.from_dict(torch.load(cached, weights_only=True))
                self._apply_head(res)
                self.log(f"AWQ+ lm_head: resumed from {cached}")
            else:
                res = self._lm_head(x)
                if cached is not None:
                    torch.save(res.to_dict(), cached.with_suffix(".tmp"))
                    cached.with_suffix(".tmp").replace(cached)
                self.log(f"AWQ+ lm_head done in {_fmt_s(time.perf_counter() - t0)} "
                         f"(search loss / RTN loss: {res.losses['lm_head']:.2f})")
            results.append(res)
        return results

    @staticmethod
    def _eta(t_start: float, i: int, n_layers: int) -> float:
        return (time.perf_counter() - t_start) / (i + 1) * (n_layers - i - 1)

    def _cache_folder(self, calib_ids: torch.Tensor) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.sha256()
        spec = {k: getattr(self.spec, k) for k in ("w_bit", "group_size", "sym")}  # AWQ and AWQ+ share a search
        layer_opts = {k: v for k, v in asdict(self.opt).items()  # what changes per-layer results
                      if k not in ("batch", "lm_head_search", "head_samples")} | {"compute_dtype": str(self.cdtype)}
        h.update(json.dumps({"config": self.model.config.to_dict(), "spec": spec, "opt": layer_opts},
                            sort_keys=True, default=str).encode())
        h.update(calib_ids.numpy().tobytes())
        with torch.no_grad():  # a cheap fingerprint of the weights
            for p in (self.model.embed_tokens.weight, self.model.layers[0].mlp.down_proj.weight,
                      self.model.layers[-1].self_attn.qkv_proj.weight):
                h.update(repr(float(p.double().sum())).encode())
        folder = Path(self.cache_dir) / h.hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _forward_all(self, layer: DecoderLayer, x: torch.Tensor, hooks: list[tuple[nn.Module, _Capture]]
                     ) -> torch.Tensor:
        """Run a compute-dtype copy of `layer` over all sequences; returns the outputs."""
        lb = copy.deepcopy(layer).to(self.cdtype)
        handles = [lb.get_submodule(path).register_forward_pre_hook(cap) for path, cap in hooks]
        try:
            out = torch.empty_like(x)
            for b in range(0, x.shape[0], self.opt.batch):
                out[b:b + self.opt.batch] = lb(x[b:b + self.opt.batch], self.cos, self.sin, 0, False)
        finally:
            for h in handles:
                h.remove()
        return out

    # ------------------------------------------------------------------ one layer
    def _layer(self, layer: DecoderLayer, x: torch.Tensor) -> tuple[LayerResult, torch.Tensor]:
        opt = self.opt
        caps = {k: _Capture(opt.search_samples) for k in ("qkv", "o", "gate_up", "down")}
        paths = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                 "down": "mlp.down_proj"}
        with torch.inference_mode():
            x_next = self._forward_all(layer, x, [(paths[k], caps[k]) for k in caps])
        attn, mlp = layer.self_attn, layer.mlp
        res = LayerResult()
        lb = copy.deepcopy(layer).to(self.cdtype)  # the module the search losses run through
        cos, sin = self.cos, self.sin

        def run_attn(ws: list[torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
            lb.self_attn.qkv_proj.weight.data = ws[0].to(self.cdtype)
            return torch.cat([lb.self_attn(inp[b:b + opt.batch], cos, sin, 0, False)
                              for b in range(0, inp.shape[0], opt.batch)])

        def run_mlp(ws: list[torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
            lb.mlp.gate_up_proj.weight.data = ws[0].to(self.cdtype)
            return torch.cat([lb.mlp(inp[b:b + opt.batch]) for b in range(0, inp.shape[0], opt.batch)])

        def run_linear(ws: list[torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
            return F.linear(inp, ws[0].to(self.cdtype))

        groups = [("attn_in", "qkv", attn.qkv_proj.weight, run_attn)]
        if self.q_size == self.kv_size:  # v -> o needs v's output width == o's input width (no GQA)
            groups.append(("v_o", "o", attn.o_proj.weight, run_linear))
        groups += [("mlp_in", "gate_up", mlp.gate_up_proj.weight, run_mlp),
                   ("up_down", "down", mlp.down_proj.weight, run_linear)]
        with torch.inference_mode():
            for gname, cap_name, weight, fn in groups:
                s, ratio = self._search_scale(caps[cap_name], weight.detach().float(), fn)
                res.scales[gname] = s
                res.losses[gname] = ratio
        self._apply_scales(layer, res.scales)
        if opt.clip:
            inputs = {"qkv": caps["qkv"].inputs, "o": caps["o"].inputs, "gate_up": caps["gate_up"].inputs,
                      "down": caps["down"].inputs}
            scale_of = {"qkv": "attn_in", "o": "v_o", "gate_up": "mlp_in", "down": "up_down"}
            for key, inp in inputs.items():
                s = res.scales.get(scale_of[key])
                feats = inp.reshape(-1, inp.shape[-1]).float()
                feats = feats[torch.linspace(0, feats.shape[0] - 1, min(opt.clip_tokens, feats.shape[0])).long()]
                if s is not None:
                    feats = feats / s
                w = getattr(attn if key in ("qkv", "o") else mlp, paths[key].split(".")[1]).weight
                rows = slice(self.q_size + self.kv_size, None) if key == "qkv" else slice(None)  # v rows only
                with torch.inference_mode():
                    res.clips[key] = self._search_clip(w.detach()[rows].float(), feats)
            self._apply_clips(layer, res.clips)
        return res, x_next

    # ------------------------------------------------------------------ searches
    def _search_scale(self, cap: _Capture, w: torch.Tensor,
                      run: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float]:
        inp = cap.inputs
        ref = run([w], inp)
        return self._grid(cap.mean.float(), w, lambda wq: _mse(run([wq], inp), ref))

    def _grid(self, x_mean: torch.Tensor, w: torch.Tensor, loss_of: Callable[[torch.Tensor], float]
              ) -> tuple[torch.Tensor, float]:
        """The 20-point ratio grid: best scale, and its loss relative to plain RTN (s = 1)."""
        spec, opt = self.spec, self.opt
        if opt.duo_scaling:
            wg = grouped(w.abs(), spec.group_size)
            w_mean = (wg / (wg.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape[0], -1)[:, :w.shape[1]].mean(0)
        best_loss, best_s = math.inf, torch.ones_like(x_mean)
        for i in range(opt.n_grid):
            r = i / opt.n_grid
            s = x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4) if opt.duo_scaling else x_mean.pow(r)
            s = s.clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            loss = loss_of(fake_quantize(w * s, spec.w_bit, spec.group_size, spec.sym) / s)
            if i == 0 and not opt.duo_scaling:
                loss_rtn = loss  # ratio 0 without duo scaling is s = 1, i.e. plain RTN
            if loss < best_loss:
                best_loss, best_s = loss, s.clone()
        if opt.duo_scaling:  # for the log: how much the search gained over plain RTN (s = 1)
            loss_rtn = loss_of(fake_quantize(w, spec.w_bit, spec.group_size, spec.sym))
        return best_s, best_loss / max(loss_rtn, 1e-20)

    # ------------------------------------------------------------------ AWQ+: the lm_head
    def _lm_head(self, x: torch.Tensor) -> LayerResult:
        """AWQ+ also searches a scale for lm_head's input. The final norm's output goes to lm_head only, but
        folding 1/s into that norm would break other tools, which run a tied lm_head from the float
        embedding; so lm_head becomes a ScaledLinear that divides its input by s itself. The loss is the
        MSE of the logits of `head_samples` sequences; then lm_head is clipped like the other linears."""
        model, opt = self.model, self.opt
        norm = copy.deepcopy(model.norm).to(self.cdtype)
        w = model.lm_head.weight.detach().float()
        res = LayerResult()
        with torch.inference_mode():
            x_mean = sum(norm(x[b:b + opt.batch]).float().abs().sum((0, 1)) for b in range(0, len(x), opt.batch))
            x_mean = x_mean / (x.shape[0] * x.shape[1])
            h = norm(x[: opt.head_samples]).reshape(-1, x.shape[-1])
            rows = 8192  # logits are computed a vocabulary slice at a time
            ref = [F.linear(h, w[r:r + rows].to(self.cdtype)) for r in range(0, w.shape[0], rows)]

            def loss_of(wq: torch.Tensor) -> float:
                err = sum(float((F.linear(h, wq[r:r + rows].to(self.cdtype)) - ref[i]).float().pow_(2).sum())
                          for i, r in enumerate(range(0, w.shape[0], rows)))
                return err / (h.shape[0] * w.shape[0])

            s, res.losses["lm_head"] = self._grid(x_mean, w, loss_of)
            res.scales["lm_head"] = s
            if opt.clip:
                feats = h.float()[torch.linspace(0, h.shape[0] - 1, min(opt.clip_tokens, h.shape[0])).long()] / s
                res.clips["lm_head"] = self._search_clip(w * s, feats)
        self._apply_head(res)
        return res

    def _search_clip(self, w: torch.Tensor, x: torch.Tensor, row_block: int = 1024) -> torch.Tensor:
        """Best max |w| per (row, group) for weight w (N, K) on input tokens x (T, K)."""
        spec, opt = self.spec, self.opt
        g = w.shape[1] if spec.group_size == -1 else spec.group_size
        xg = F.pad(x, (0, (-x.shape[1]) % g)).reshape(x.shape[0], -1, g).transpose(0, 1)  # (ng, T, G) zero-padded
        best_all = []
        for r0 in range(0, w.shape[0], row_block):
            wg = grouped(w[r0:r0 + row_block], spec.group_size)                     # (n, ng, G)
            wt = wg.permute(1, 2, 0)                                                 # (ng, G, n)
            ref = torch.bmm(xg, wt)                                                  # (ng, T, n)
            org_max = wg.abs().amax(-1, keepdim=True)                                # (n, ng, 1)
            best_max, min_err = org_max.clone(), torch.full_like(org_max, math.inf)
            for i in range(int(opt.max_shrink * opt.clip_grid)):
                max_val = org_max * (1 - i / opt.clip_grid)
                q = fake_quantize_groups(torch.clamp(wg, -max_val, max_val), spec.w_bit, spec.sym)
                err = (torch.bmm(xg, q.permute(1, 2, 0)) - ref).pow(2).mean(1)      # (ng, n)
                err = err.t().unsqueeze(-1)                                          # (n, ng, 1)
                better = err < min_err
                min_err = torch.where(better, err, min_err)
                best_max = torch.where(better, max_val, best_max)
            best_all.append(best_max.squeeze(-1))
        return torch.cat(best_all)

    # ------------------------------------------------------------------ applying results (fp32 master)
    @torch.no_grad()
    def _apply_scales(self, layer: DecoderLayer, scales: dict[str, torch.Tensor]) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        if "attn_in" in scales:
            s = scales["attn_in"]
            layer.input_layernorm.weight.div_(s)
            attn.qkv_proj.weight.mul_(s[None, :])
        if "v_o" in scales:
            s = scales["v_o"]
            attn.qkv_proj.weight[-self.kv_size:].div_(s[:, None])  # v rows are last in the fused qkv
            if attn.qkv_proj.bias is not None:
                attn.qkv_proj.bias[-self.kv_size:].div_(s)
            attn.o_proj.weight.mul_(s[None, :])
        if "mlp_in" in scales:
            s = scales["mlp_in"]
            layer.post_attention_layernorm.weight.div_(s)
            mlp.gate_up_proj.weight.mul_(s[None, :])
        if "up_down" in scales:
            s = scales["up_down"]
            mlp.gate_up_proj.weight[-self.inter:].div_(s[:, None])  # up rows are last in the fused gate_up
            mlp.down_proj.weight.mul_(s[None, :])

    @torch.no_grad()
    def _apply_clips(self, layer: DecoderLayer, clips: dict[str, torch.Tensor]) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        targets = {"qkv": (attn.qkv_proj.weight, self.q_size + self.kv_size), "o": (attn.o_proj.weight, 0),
                   "gate_up": (mlp.gate_up_proj.weight, 0), "down": (mlp.down_proj.weight, 0)}
        for key, max_val in clips.items():
            weight, r0 = targets[key]
            self._clamp_rows(weight[r0:], max_val)

    @torch.no_grad()
    def _clamp_rows(self, w: torch.Tensor, max_val: torch.Tensor) -> None:
        """Clamp each (row, group) of w (a view, modified in place) to +-max_val."""
        wg = grouped(w, self.spec.group_size)
        m = max_val[..., None].to(wg.dtype)
        w.copy_(torch.clamp(wg, -m, m).reshape(w.shape[0], -1)[:, :w.shape[1]])

    @torch.no_grad()
    def _apply_head(self, res: LayerResult) -> None:
        """lm_head := ScaledLinear(W * s, input scale 1/s), clipped; a tied embedding keeps its weight."""
        s = res.scales["lm_head"]
        head = ScaledLinear(self.model.lm_head.weight.detach().float() * s[None, :], 1.0 / s)
        if "lm_head" in res.clips:
            self._clamp_rows(head.weight, res.clips["lm_head"])
        self.model.lm_head = head


def run_awq(model: Transformer, calib_ids: torch.Tensor, spec: QuantSpec, options: AWQOptions | None = None,
            cache_dir: Path | None = None, log: Callable[[str], None] = _log,
            progress: ProgressFn | None = None) -> list[LayerResult]:
    """Apply AWQ scales and clipping to an fp32 model in place (quantize the weights afterwards)."""
    return AWQ(model, spec, options, cache_dir, log, progress).run(calib_ids)
