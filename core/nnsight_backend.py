"""The nnsight backend: the `core.backend` views on a Hugging Face model wrapped by nnsight.

Each view is one traced program (a few, for a sweep: one per chunk of `max_rows` rows) that
computes its numbers where the model runs and saves only what the page draws: a [layer, head]
grid, a metric per patched row, top-k tokens. On this machine (`transport=None`) nnsight runs the
program here; with a `core.ndif.Transport` the same program is sent to NDIF, and the model's
weights never come here (the model is built on the meta device from its config).

The programs only touch what nnsight ships by value: module envoys, torch, and plain numbers and
tensors bound before the trace. nnsight needs modules read in the order the forward pass runs
them; every loop below goes layer by layer for that reason.
"""
from __future__ import annotations

import threading
from pathlib import Path

import nnsight
import torch

from core.attribution import Attribution, LogitLens
from core.backend import (
    Backend,
    BackendError,
    Patching,
    Spec,
    _check_one,
    _check_pair,
    _chunks,
    _units,
    check_architecture,
)

_STAGE = {"resid_pre": 0, "z": 1, "pattern": 2, "attn_out": 3, "mlp_out": 4, "resid_post": 5}


def load_local(path: str | Path, dtype: str = "float32"):
    """An nnsight `TransformersModel` on a Hugging Face checkpoint folder, on this machine, with
    eager attention (the attention view reads the weights the model computes)."""
    from nnsight import TransformersModel

    from core.models import load_tokenizer
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    try:
        return TransformersModel(str(path), task="text-generation", dispatch=True, attn_implementation="eager",
                                 dtype=torch_dtype, tokenizer=load_tokenizer(Path(path)))
    except Exception as e:  # noqa: BLE001 - a damaged or unreadable folder is told, not raised
        raise BackendError(f"nnsight could not load {path}: {type(e).__name__}: {e}") from None


_locks_guard = threading.Lock()


def _model_lock(lm) -> threading.RLock:
    """One lock per nnsight model, shared by every backend built on it (the page builds a backend
    per run; the model is cached for every session)."""
    module = lm._module
    with _locks_guard:
        lock = module.__dict__.get("_circuit_explorer_lock")
        if lock is None:
            lock = threading.RLock()
            module.__dict__["_circuit_explorer_lock"] = lock
        return lock


def _detached(value):
    """Saved values without autograd history (a server may run the forward pass with it on)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


def _get(root, dotted: str):
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _spec(config, architecture: str) -> Spec:
    g = lambda *names, default=None: next((getattr(config, n) for n in names if getattr(config, n, None) is not None), default)  # noqa: E731
    d_model = g("hidden_size", "n_embd")
    n_heads = g("num_attention_heads", "n_head")
    cap = g("final_logit_softcapping")
    return Spec(
        architecture=architecture, n_layers=g("num_hidden_layers", "n_layer"), n_heads=n_heads,
        n_kv_heads=g("num_key_value_heads", default=n_heads), d_model=d_model,
        d_head=g("head_dim", default=d_model // n_heads), d_vocab=g("vocab_size"),
        n_ctx=g("max_position_embeddings", "n_positions", default=2048),
        layer_norm=architecture == "GPT2LMHeadModel", softcap=float(cap) if cap else None)


class NNsightBackend(Backend):
    """The views on an nnsight model, run here (`transport=None`) or remotely (`core.ndif`)."""

    def __init__(self, lm, transport=None, max_rows: int = 64):
        self.lm = lm
        self.transport = transport
        self.max_rows = max_rows
        config = lm._module.config
        architecture = (getattr(config, "architectures", None) or [type(lm._module).__name__])[0]
        self.layout = check_architecture(architecture)
        self.spec = _spec(config, architecture)
        self.eps = float(getattr(config, "layer_norm_epsilon", None) or getattr(config, "rms_norm_eps", None) or 1e-5)
        self.center_unembed = self.spec.softcap is None
        self.lock = _model_lock(lm)
        self.eager = getattr(config, "_attn_implementation", None) == "eager"

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def where(self) -> str:
        return "this machine" if self.transport is None else self.transport.name

    def to_tokens(self, text: str) -> torch.Tensor:
        with self.lock:
            ids = self.lm.tokenizer(text, return_tensors="pt")["input_ids"]
        bos = self.lm.tokenizer.bos_token_id
        if bos is not None and (ids.shape[1] == 0 or int(ids[0, 0]) != bos):
            ids = torch.cat([torch.tensor([[bos]]), ids], 1)
        return ids

    def str_tokens(self, tokens: torch.Tensor) -> list[str]:
        with self.lock:
            return [self.lm.tokenizer.decode([int(t)]) for t in torch.as_tensor(tokens).reshape(-1)]

    def _backend(self, what: str, eager: bool = False):
        return None if self.transport is None else self.transport.backend(self.lm, what, eager=eager)

    def _result(self, backend, local: dict, names: list[str], shapes: dict | None = None) -> dict:
        """The saved values: from the trace's frame here, from the transport when remote."""
        out = {n: local[n] for n in names} if backend is None else self.transport.wait(backend, shapes or {})
        return {n: _detached(v) for n, v in out.items()}

    def _blocks(self):
        return _get(self.lm, self.layout.layers)

    # -- views ---------------------------------------------------------------------------------
    def attention_patterns(self, tokens, layers):
        _check_one(tokens, self.spec)
        if not self.eager:
            raise BackendError("This model was loaded without eager attention, so it computes no attention weights.")
        asked = [int(layer) for layer in layers]
        if any(not 0 <= layer < self.spec.n_layers for layer in asked):
            raise BackendError(f"Layers are 0 to {self.spec.n_layers - 1}; asked for {asked}.")
        layers = sorted(set(asked))  # read in the order the forward pass runs them
        blocks, attn = self._blocks(), self.layout.attn
        be = self._backend("attention patterns", eager=True)
        with self.lock, self.lm.trace(tokens, backend=be):
            with torch.no_grad():  # on the server too: no autograd graph of the forward pass
                pats = []
                for layer in layers:
                    pats.append(getattr(blocks[layer], attn).output[1][0].float())
                patterns = torch.stack(pats).save()
        shape = (len(layers), self.spec.n_heads, tokens.shape[1], tokens.shape[1])
        patterns = self._result(be, locals(), ["patterns"], {"patterns": shape})["patterns"]
        return patterns[[layers.index(layer) for layer in asked]]  # in the order asked

    def _residuals_trace(self, tokens, answer, k, what):
        """Residual stream before each layer and after the last: norms, and the logit lens."""
        blocks, final_norm, lm_head = self._blocks(), _get(self.lm, self.layout.final_norm), self.lm.lm_head
        n_layers, centre, cap = self.spec.n_layers, self.spec.layer_norm, self.spec.softcap
        lens = what == "lens"
        be = self._backend("logit lens" if lens else "residual norms")
        with self.lock, self.lm.trace(tokens, backend=be):
            with torch.no_grad():  # on the server too: no autograd graph of the forward pass
                resid = [blocks[layer].input[0].float().clone() for layer in range(n_layers)]
                resid.append(final_norm.input[0].float().clone())
                stack = torch.stack(resid)  # [layer + 1, pos, d_model]
                if not lens:
                    if centre:
                        stack = stack - stack.mean(-1, keepdim=True)
                    norms = stack.norm(dim=-1).save()
                else:
                    ids, probs, a_prob, a_rank = [], [], [], []
                    for r in stack:
                        logits = lm_head(final_norm(r[None].to(final_norm.weight.dtype)))[0].float()
                        if cap is not None:
                            logits = cap * torch.tanh(logits / cap)
                        p = logits.softmax(-1)
                        top = p.topk(k, dim=-1)
                        ids.append(top.indices)
                        probs.append(top.values)
                        if answer is not None:
                            a_prob.append(p[:, answer])
                            a_rank.append((logits > logits[:, answer:answer + 1]).sum(-1))
                    top_ids = torch.stack(ids).save()
                    top_probs = torch.stack(probs).save()
                    if answer is not None:
                        answer_prob = torch.stack(a_prob).save()
                        answer_rank = torch.stack(a_rank).save()
        n, p = n_layers + 1, tokens.shape[1]
        if not lens:
            return self._result(be, locals(), ["norms"], {"norms": (n, p)})["norms"]
        names = ["top_ids", "top_probs"] + (["answer_prob", "answer_rank"] if answer is not None else [])
        shapes = {"top_ids": (n, p, k), "top_probs": (n, p, k), "answer_prob": (n, p), "answer_rank": (n, p)}
        return self._result(be, locals(), names, shapes)

    def residual_norms(self, tokens):
        _check_one(tokens, self.spec)
        labels = [f"{layer}_pre" for layer in range(self.spec.n_layers)] + ["final_post"]
        return self._residuals_trace(tokens, None, 1, "norms"), labels

    def logit_lens(self, tokens, answer=None, k=5):
        _check_one(tokens, self.spec)
        out = self._residuals_trace(tokens, answer, k, "lens")
        labels = [f"{layer}_pre" for layer in range(self.spec.n_layers)] + ["final_post"]
        return LogitLens(labels, out["top_ids"], out["top_probs"], out.get("answer_prob"), out.get("answer_rank"))

    def dla(self, tokens, answer, wrong=None, by="layer"):
        _check_one(tokens, self.spec)
        if by not in ("layer", "head"):
            raise BackendError(f"Unknown attribution {by!r}: 'layer' or 'head'.")
        lay, spec = self.layout, self.spec
        blocks, final_norm, lm_head = self._blocks(), _get(self.lm, lay.final_norm), self.lm.lm_head
        embed = _get(self.lm, lay.embed)
        pos_embed = _get(self.lm, lay.pos_embed) if lay.pos_embed else None
        n_layers, n_heads, n_kv, d_head = spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.d_head
        attn, out_proj, mlp = lay.attn, lay.out_proj, lay.mlp
        post_attn, post_mlp, offset, conv1d = lay.post_attn_norm, lay.post_mlp_norm, lay.norm_offset, lay.conv1d
        centre, eps, cap = spec.layer_norm, self.eps, spec.softcap
        single_centred = wrong is None and self.center_unembed
        gpt2 = conv1d
        be = self._backend("direct logit attribution")
        with self.lock, self.lm.trace(tokens, backend=be):
            with torch.no_grad():  # on the server too: no autograd graph of the forward pass
                first = []
                if pos_embed is not None:
                    first.append(embed.output[0, -1].float())
                    first.append(pos_embed.output[0, -1].float())
                else:
                    first.append(blocks[0].input[0, -1].float())
                zs, attn_raw, attn_res, mlp_res = [], [], [], []
                for layer in range(n_layers):
                    block = blocks[layer]
                    a = getattr(block, attn)
                    zs.append(getattr(a, out_proj).input[0, -1].float())
                    raw = a.output[0][0, -1].float()
                    attn_raw.append(raw)
                    attn_res.append(getattr(block, post_attn).output[0, -1].float() if post_attn else raw)
                    m_out = getattr(block, mlp).output[0, -1].float()
                    mlp_res.append(getattr(block, post_mlp).output[0, -1].float() if post_mlp else m_out)
                final = final_norm.input[0, -1].float()
                logits = lm_head.output[0, -1].float()
                # The direction in the normalised residual stream whose dot product is the target.
                W_U = lm_head.weight
                du = W_U[answer].float() - (W_U[wrong].float() if wrong is not None
                                            else (W_U.mean(0, dtype=torch.float32) if single_centred else 0.0))
                w_final = final_norm.weight.float() + offset
                u = du * w_final
                if centre:
                    u = u - u.mean()
                    scale = ((final - final.mean()) ** 2).mean().add(eps).sqrt()
                else:
                    scale = (final ** 2).mean().add(eps).sqrt()
                bias = torch.zeros(())
                if getattr(final_norm, "bias", None) is not None:
                    bias = bias + (final_norm.bias.float() * du).sum()
                if lm_head.bias is not None:
                    b_U = lm_head.bias.float()
                    bias = bias + b_U[answer] - (b_U[wrong] if wrong is not None else (b_U.mean() if single_centred else 0.0))
                comps = [(c * u).sum() / scale for c in first]
                for layer in range(n_layers):
                    comps.append((attn_res[layer] * u).sum() / scale)
                    comps.append((mlp_res[layer] * u).sum() / scale)
                heads, attn_bias = [], torch.zeros(())
                for layer in range(n_layers):
                    block = blocks[layer]
                    a = getattr(block, attn)
                    proj = getattr(a, out_proj)
                    w_in = u
                    if post_attn:  # through the norm after attention, with this run's own scale
                        pn = getattr(block, post_attn)
                        raw = attn_raw[layer]
                        s_post = (raw ** 2).mean().add(eps).sqrt()
                        w_in = u * (pn.weight.float() + offset) / s_post
                    W_O = proj.weight.float()
                    v = (W_O @ w_in if conv1d else w_in @ W_O).reshape(n_heads, d_head)  # [head, d_head]
                    z = zs[layer].reshape(n_heads, d_head)
                    if gpt2:  # the value bias, and what ln_1's bias adds to every value
                        d_all = n_heads * d_head
                        b_V = (a.c_attn.bias.float()[2 * d_all:]
                               + block.ln_1.bias.float() @ a.c_attn.weight.float()[:, 2 * d_all:]).reshape(n_heads, d_head)
                    elif a.v_proj.bias is not None:
                        b_V = a.v_proj.bias.float().reshape(n_kv, d_head).repeat_interleave(n_heads // n_kv, 0)
                    else:
                        b_V = torch.zeros_like(z)
                    heads.append(((z - b_V) * v).sum(-1) / scale)
                    layer_bias = (b_V * v).sum()
                    if proj.bias is not None:
                        b_O = proj.bias.float()
                        layer_bias = layer_bias + ((b_O * w_in).sum() if not post_attn else 0.0)
                    attn_bias = attn_bias + layer_bias / scale
                if cap is not None:
                    logits = cap * torch.tanh(logits / cap)
                components = torch.stack(comps).save()
                head_values = torch.cat(heads).save()
                attn_bias = attn_bias.save()
                bias = bias.save()
        n_first = 2 if pos_embed is not None else 1
        shapes = {"components": (n_first + 2 * n_layers,), "head_values": (n_layers * n_heads,),
                  "attn_bias": (), "bias": ()}
        out = self._result(be, locals(), ["components", "head_values", "attn_bias", "bias"], shapes)
        first_labels = ["embed", "pos_embed"][:n_first]
        comps = out["components"].reshape(-1)
        b = out["bias"].reshape(1)
        if by == "layer":
            labels = first_labels + [f"{layer}_{kind}" for layer in range(n_layers) for kind in ("attn_out", "mlp_out")]
            return Attribution(labels, comps[:, None], b, cap)
        mlps = comps[n_first + 1::2]
        labels = ([f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)] + first_labels
                  + [f"{layer}_mlp_out" for layer in range(n_layers)] + ["attn bias"])
        values = torch.cat([out["head_values"].reshape(-1), comps[:n_first], mlps, out["attn_bias"].reshape(1)])
        return Attribution(labels, values[:, None], b, cap)

    # -- patching ------------------------------------------------------------------------------
    def _module_for(self, target: str, layer: int):
        """(envoy, attribute) whose value is `target`'s activation at `layer`."""
        block = self._blocks()[layer]
        lay = self.layout
        if target == "resid_pre":
            return block, "input"
        if target == "z":
            return getattr(getattr(block, lay.attn), lay.out_proj), "input"
        if target == "attn_out":
            return (getattr(block, lay.post_attn_norm), "output") if lay.post_attn_norm else (getattr(block, lay.attn), "output0")
        if target == "mlp_out":
            return (getattr(block, lay.post_mlp_norm), "output") if lay.post_mlp_norm else (getattr(block, lay.mlp), "output")
        raise BackendError(f"Unknown patching target {target!r}: one of resid_pre, attn_out, mlp_out, z.")

    def patch(self, base, source, answer, wrong=None, target="resid_pre", progress=None):
        _check_pair(base, source, self.spec)
        units = _units(target, self.spec, base.shape[1])
        values = torch.full((len(units),), float("nan"))
        base_m = source_m = float("nan")
        size = self.transport.rows_per_request(base.shape[1]) if self.transport else self.max_rows
        groups = _chunks(list(enumerate(units)), max(1, size - 2))  # each chunk also runs source and base
        failed = None
        for n, group in enumerate(groups):
            if progress:
                progress(n / len(groups), f"request {n + 1} of {len(groups)} ({len(group)} patched runs)"
                         if self.transport else f"forward pass {n + 1} of {len(groups)}")
            try:
                m = self._patch_chunk(base, source, answer, wrong, target, [u for _, u in group])
            except BackendError as e:
                if n == 0:
                    raise
                failed = f"{n} of {len(groups)} requests finished; then: {e}"
                break
            source_m, base_m = float(m[0]), float(m[1])
            for r, (j, _) in enumerate(group, start=2):
                values[j] = m[r]
        if progress:
            progress(1.0, "done")
        return Patching(target, values.reshape(self.spec.n_layers, -1), base_m, source_m, failed)

    def _patch_chunk(self, base, source, answer, wrong, target, units) -> torch.Tensor:
        """[2 + len(units)] metric of the source, the base and each patched base run. A remote
        chunk that finished before is not sent again (a sweep run again after a failure sends only
        what is missing)."""
        key = None
        if self.transport is not None:
            key = ("patch", self.lm.to_model_key(), target, tuple(base[0].tolist()), tuple(source[0].tolist()), answer, wrong,
                   tuple(units))
            if key in self.transport.done:
                return self.transport.done[key]
        metric = self._patch_chunk_run(base, source, answer, wrong, target, units)
        if key is not None:
            self.transport.remember(key, metric)
        return metric

    def _patch_chunk_run(self, base, source, answer, wrong, target, units) -> torch.Tensor:
        rows = torch.cat([source, base] + [base] * len(units))
        by_layer: dict[int, tuple[list[int], list[int]]] = {}
        for r, (layer, i) in enumerate(units, start=2):
            by_layer.setdefault(layer, ([], []))
            by_layer[layer][0].append(r)
            by_layer[layer][1].append(i)
        plan = []
        for layer in sorted(by_layer):
            module, attr = self._module_for(target, layer)
            plan.append((module, attr, torch.tensor(by_layer[layer][0]), torch.tensor(by_layer[layer][1])))
        heads, d_head, cap = target == "z", self.spec.d_head, self.spec.softcap
        centred = wrong is None and self.center_unembed
        lm_head = self.lm.lm_head
        be = self._backend("patching")
        with self.lock, self.lm.trace(rows, backend=be):
            with torch.no_grad():  # on the server too: no autograd graph of the forward pass
                for module, attr, r, i in plan:
                    act = module.input if attr == "input" else (module.output[0] if attr == "output0" else module.output)
                    if heads:
                        for row, head in zip(r.tolist(), i.tolist()):
                            cols = slice(head * d_head, (head + 1) * d_head)
                            act[row, :, cols] = act[0, :, cols]
                    else:
                        act[r, i] = act[0, i]
                lg = lm_head.output[:, -1].float()
                if cap is not None:
                    lg = cap * torch.tanh(lg / cap)
                if wrong is not None:
                    metric = (lg[:, answer] - lg[:, wrong]).save()
                elif centred:
                    metric = (lg[:, answer] - lg.mean(-1)).save()
                else:
                    metric = lg[:, answer].save()
        return self._result(be, locals(), ["metric"], {"metric": (rows.shape[0],)})["metric"]

    def attribution_patch(self, base, source, answer, wrong=None, target="resid_pre"):
        _check_pair(base, source, self.spec)
        mods = [self._module_for(target, layer) for layer in range(self.spec.n_layers)]
        n_layers, n_heads, d_head, cap = self.spec.n_layers, self.spec.n_heads, self.spec.d_head, self.spec.softcap
        heads = target == "z"
        centred = wrong is None and self.center_unembed
        lm_head = self.lm.lm_head
        rows = torch.cat([source, base])
        be = self._backend("attribution patching")
        with self.lock, self.lm.trace(rows, backend=be):
            with torch.enable_grad():  # a server may run requests with gradients off or its weights frozen
                acts = []
                for module, attr in mods:
                    act = module.input if attr == "input" else (module.output[0] if attr == "output0" else module.output)
                    if not act.requires_grad:
                        act.requires_grad_(True)
                    acts.append(act)
                lg = lm_head.output[:, -1].float()
                if cap is not None:
                    lg = cap * torch.tanh(lg / cap)
                if wrong is not None:
                    m = lg[:, answer] - lg[:, wrong]
                elif centred:
                    m = lg[:, answer] - lg.mean(-1)
                else:
                    m = lg[:, answer]
                metric = m.detach().save()
                grads = torch.autograd.grad(m[1], acts)
                est = []
                for act, g in zip(acts, grads):
                    diff = (act[0] - act[1]).detach().float() * g[1].float()
                    if heads:
                        est.append(diff.reshape(diff.shape[0], n_heads, d_head).sum(dim=(0, 2)))
                    else:
                        est.append(diff.sum(-1))
                estimate = torch.stack(est).save()
        shapes = {"metric": (2,), "estimate": (n_layers, n_heads if heads else base.shape[1])}
        out = self._result(be, locals(), ["metric", "estimate"], shapes)
        base_m = float(out["metric"][1])
        return Patching(target, (base_m + out["estimate"]).float(), base_m, float(out["metric"][0]))

    def steer(self, tokens, layer, vector, alpha, from_pos=0, k=10):
        _check_one(tokens, self.spec)
        from core.steering import distribution_shift
        if not 0 <= layer < self.spec.n_layers:
            raise BackendError(f"Layer {layer} is not in the model (0 to {self.spec.n_layers - 1}).")
        if vector.shape != (self.spec.d_model,):
            raise BackendError(f"The direction has {vector.numel()} numbers; this model's residual stream has {self.spec.d_model}.")
        block, lm_head, cap = self._blocks()[layer], self.lm.lm_head, self.spec.softcap
        centred = self.center_unembed
        add = (alpha * vector.float())
        be = self._backend("steering")
        with self.lock, self.lm.trace(torch.cat([tokens, tokens]), backend=be):
            with torch.no_grad():  # on the server too: no autograd graph of the forward pass
                h = block.input
                h[1, from_pos:] += add.to(device=h.device, dtype=h.dtype)  # the model may be on a GPU
                lg = lm_head.output[:, -1].float()
                if cap is not None:
                    lg = cap * torch.tanh(lg / cap)
                if centred:
                    lg = lg - lg.mean(-1, keepdim=True)
                logits = lg.save()
        out = self._result(be, locals(), ["logits"], {"logits": (2, self.spec.d_vocab)})["logits"]
        return distribution_shift(out[0], out[1], k)

    # -- primitives ----------------------------------------------------------------------------
    def _hook_target(self, name: str) -> tuple[int, str]:
        parts = name.split(".")
        if len(parts) >= 3 and parts[0] == "blocks" and parts[1].isdigit():
            kind = parts[-1].removeprefix("hook_")
            if kind in _STAGE:
                return int(parts[1]), kind
        raise BackendError(f"The nnsight backend reads blocks.L.hook_resid_pre / resid_post / attn_out / mlp_out "
                           f"and blocks.L.attn.hook_z / hook_pattern; not {name!r}.")

    def run(self, tokens, reads, edits=(), logit_positions=None):
        """TransformerLens names and shapes; hook_z excludes the value bias and, on LayerNorm
        models, the residual stream and attn_out / mlp_out are centred, as the TL backend's are."""
        steps: dict[tuple[int, int], dict] = {}
        for name in reads:
            layer, kind = self._hook_target(name)
            steps.setdefault((layer, _STAGE[kind]), {"kind": kind, "reads": [], "edits": []})["reads"].append(name)
        for e in edits:
            layer, kind = self._hook_target(e.hook)
            if kind == "pattern":
                raise BackendError("Attention patterns can be read, not edited, on the nnsight backend.")
            if e.kind not in ("patch", "add", "zero"):
                raise BackendError(f"Unknown edit {e.kind!r}: 'patch', 'add' or 'zero'.")
            value = None if e.value is None else torch.as_tensor(e.value).float()
            # A plain tuple: the request is unpickled on NDIF, where this package is not installed.
            steps.setdefault((layer, _STAGE[kind]), {"kind": kind, "reads": [], "edits": []})["edits"].append(
                (e.kind, value, e.pos, e.head, e.start))
        plan = []
        for (layer, _), step in sorted(steps.items()):
            kind = step["kind"]
            if kind == "pattern":
                module, attr = getattr(self._blocks()[layer], self.layout.attn), "output1"
            elif kind == "resid_post":
                module, attr = self._blocks()[layer], "output"
            else:
                module, attr = self._module_for(kind, layer)
            block = self._blocks()[layer]
            attn = getattr(block, self.layout.attn) if kind == "z" else None
            plan.append((module, attr, kind, step["reads"], step["edits"], attn, block))
        n_heads, n_kv, d_head, centre = self.spec.n_heads, self.spec.n_kv_heads, self.spec.d_head, self.spec.layer_norm
        gpt2, cap = self.layout.conv1d, self.spec.softcap
        lm_head = self.lm.lm_head
        be = self._backend("run", eager=any(step["kind"] == "pattern" for step in steps.values()))
        with self.lock, self.lm.trace(tokens, backend=be):
            with torch.no_grad():  # on the server too: no autograd graph of the forward pass
                saved = {}
                for module, attr, kind, names, step_edits, attn, block in plan:
                    # hook_z in TL excludes what each head's value bias adds (fold_value_biases); on
                    # GPT-2 that includes ln_1's bias times W_V. Read from the weights where they live.
                    b_V = None
                    if kind == "z" and gpt2:
                        d_all = n_heads * d_head
                        b_V = (attn.c_attn.bias.float()[2 * d_all:]
                               + block.ln_1.bias.float() @ attn.c_attn.weight.float()[:, 2 * d_all:]).reshape(n_heads, d_head)
                    elif kind == "z" and attn.v_proj.bias is not None:
                        b_V = attn.v_proj.bias.float().reshape(n_kv, d_head).repeat_interleave(n_heads // n_kv, 0)
                    if attr == "input":
                        act = module.input
                    elif attr == "output0":
                        act = module.output[0]
                    elif attr == "output1":
                        act = module.output[1]
                    else:
                        act = module.output
                    view = act.view(act.shape[0], act.shape[1], n_heads, d_head) if kind == "z" else act
                    for e_kind, e_value, e_pos, e_head, e_start in step_edits:
                        sel = view[:, :, e_head] if e_head is not None else view
                        idx = (slice(None), e_pos) if e_pos is not None else (slice(None), slice(e_start, None))
                        bv = 0.0 if b_V is None else (b_V[e_head] if e_head is not None else b_V)
                        if e_kind == "zero":
                            sel[idx] = bv
                        elif e_kind == "patch":  # values travel on the CPU; the model may be on a GPU
                            sel[idx] = (e_value.to(act.device) + bv).to(act.dtype)
                        else:
                            sel[idx] += e_value.to(device=act.device, dtype=act.dtype)
                    value = view.detach().float().clone()
                    if kind == "z" and b_V is not None:
                        value = value - b_V
                    elif centre and kind in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
                        value = value - value.mean(-1, keepdim=True)
                    for name in names:
                        saved[name] = value
                lg = lm_head.output.float()
                lg = lg if logit_positions is None else lg[:, logit_positions]
                if cap is not None:
                    lg = cap * torch.tanh(lg / cap)
                saved["logits"] = lg
                saved = nnsight.save(saved)
        return self._result(be, locals(), ["saved"], {"saved": None})["saved"]

    def gradients(self, tokens, hooks, answer, wrong=None, pos=-1):
        targets = [self._hook_target(h) for h in hooks]
        for name, (_, kind) in zip(hooks, targets):
            if kind not in ("resid_pre", "attn_out", "mlp_out", "z"):
                raise BackendError(f"Gradients are taken at hook_resid_pre, hook_attn_out, hook_mlp_out and "
                                   f"attn.hook_z on the nnsight backend; not {name!r}.")
        order = sorted(range(len(hooks)), key=lambda j: (targets[j][0], _STAGE[targets[j][1]]))
        mods = [self._module_for(targets[j][1], targets[j][0]) for j in order]
        cap, centred = self.spec.softcap, wrong is None and self.center_unembed
        n_heads, d_head = self.spec.n_heads, self.spec.d_head
        kinds = [targets[j][1] for j in order]
        lm_head = self.lm.lm_head
        be = self._backend("gradients")
        with self.lock, self.lm.trace(tokens, backend=be):
            with torch.enable_grad():  # a server may run requests with gradients off or its weights frozen
                acts = []
                for module, attr in mods:
                    act = module.input if attr == "input" else (module.output[0] if attr == "output0" else module.output)
                    if not act.requires_grad:
                        act.requires_grad_(True)
                    acts.append(act)
                lg = lm_head.output[:, pos].float()
                if cap is not None:
                    lg = cap * torch.tanh(lg / cap)
                if wrong is not None:
                    m = lg[:, answer] - lg[:, wrong]
                elif centred:
                    m = lg[:, answer] - lg.mean(-1)
                else:
                    m = lg[:, answer]
                grads = []
                for kind, g in zip(kinds, torch.autograd.grad(m.sum(), acts)):
                    g = g.detach().float()
                    grads.append(g.reshape(g.shape[0], g.shape[1], n_heads, d_head) if kind == "z" else g)
                grads = nnsight.save(grads)
        out = self._result(be, locals(), ["grads"], {"grads": None})["grads"]
        return {hooks[j]: out[i] for i, j in enumerate(order)}
