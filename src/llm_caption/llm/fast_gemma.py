"""Greedy chat answers from a merged Gemma-3 folder in plain torch: the chat command's and the served model's fast path.

A merged release model (:mod:`llm_caption.llm.merged`) is a plain Gemma-3 checkpoint. Answering one chat with it
through ``transformers`` costs, before the first token, importing its Gemma-3 modelling code (3.3 s on the 2-core
machine: it pulls in ``torch._dynamo`` and ``torch.distributed``), ``PreTrainedTokenizerFast``'s set-up of 6,000+
added tokens (1.7 s), and then ``generate``'s per-token machinery around 18 small layers. Here the same network
is a few functions over the checkpoint's tensors (``safetensors``), the tokenizer is the ``tokenizers`` object of
``tokenizer.json`` with the chat template rendered by ``jinja2`` (as ``apply_chat_template`` renders it), and the
decoding loop applies the logits processors the registered models use, written as ``transformers`` writes them
(repetition penalty, no-repeat n-grams, the exponential end-of-turn boost, the other-script penalty; in its
order), so a folder answers with the tokens ``generate`` gives for the same weights (tested, fp32).

:class:`GemmaChat` also chooses how the weights are read, the dominant cost of a token on a CPU (memory-bound):
``body_dtype`` for the layers (fp32 as saved, or bf16: half the bytes) and ``head`` for the 262,144-word output
layer: every logit from a bf16, int8 or int4 copy, then the highest and the stop tokens recomputed in fp32
(:func:`exact_top`), so the winner is the fp32 layer's whenever it is among them. What this
path does not cover (sampling, a setting it does not implement, another architecture: :func:`unsupported`) is
answered through ``transformers``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MERGED_FILE = "llm_caption_merged.json"  # a merged model folder's own file (llm.merged)
TOKENIZER_FILE = "tokenizer.json"
DECODE_FILE = "llm_caption_decode.safetensors"  # beside a merged model: its int8 output layer, other-script ids
SETTINGS = {"max_new_tokens", "do_sample", "repetition_penalty", "no_repeat_ngram_size",
            "exponential_decay_length_penalty", "non_persian_penalty", "stop_tokens"}
HEADS = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 64  # weights per scale/zero pair of the int4 output layer
BODY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def unsupported_settings(settings: Mapping[str, Any]) -> str | None:
    """None when :class:`GemmaChat` decodes with ``settings``, else what it does not do."""
    if settings.get("do_sample"):
        return "sampling"
    if unknown := sorted(set(settings) - SETTINGS):
        return f"settings {unknown}"
    return None


def unsupported(folder: str | Path) -> str | None:
    """None when :class:`GemmaChat` can run the merged model in ``folder``, else why not (one line)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"config.json: {error}"
    if config.get("model_type") != "gemma3_text":
        return f"model_type {config.get('model_type')!r} is not gemma3_text"
    if config.get("attn_logit_softcapping") is not None or config.get("final_logit_softcapping") is not None:
        return "logit soft-capping"
    if config.get("use_bidirectional_attention"):
        return "bidirectional attention"
    if any((r or {}).get("rope_type", "default") != "default" for r in (config.get("rope_parameters") or {}).values()):
        return "scaled RoPE"
    return None


class FolderTokenizer:
    """The tokenizer of a merged folder without ``transformers``: ``tokenizers.Tokenizer`` of its ``tokenizer.json``
    and its chat template rendered by ``jinja2`` in a sandbox, as ``PreTrainedTokenizerFast`` does (same ids, same
    text: tested)."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.folder = folder
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        info = json.loads((folder / MERGED_FILE).read_text(encoding="utf-8"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}

        def token(name: str) -> str | None:
            value = info.get(name) or config.get(name)
            return value.get("content") if isinstance(value, dict) else value

        self.bos_token, self.eos_token, self.pad_token = token("bos_token"), token("eos_token"), token("pad_token")
        self.pad_token_id = self.token_id(self.pad_token) if self.pad_token else 0
        self.eos_token_id = self.token_id(self.eos_token) if self.eos_token else None
        self.stop_tokens = [str(t) for t in info.get("stop_tokens") or []]
        jinja = folder / "chat_template.jinja"
        template = jinja.read_text(encoding="utf-8") if jinja.is_file() else config.get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json)")
        self.template = _compile_template(template)

    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{token!r} is not a token of {self.folder / TOKENIZER_FILE}")
        return int(token_id)

    def stop_ids(self, extra: Sequence[str] = ()) -> list[int]:
        """The eos id, the folder's stop tokens, then ``extra`` (as :func:`llm_caption.llm.generation.stop_token_ids`)."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        for token in [*self.stop_tokens, *extra]:
            if (token_id := self.token_id(token)) not in ids:
                ids.append(token_id)
        return ids

    def prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self.template.render(messages=[dict(m) for m in messages], add_generation_prompt=True,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def non_persian_ids(self) -> torch.Tensor:
        """:func:`llm_caption.llm.generation.non_persian_tokens` of this tokenizer (added tokens left out)."""
        from .text_metrics import has_other_script_letter

        special = set(self.tokenizer.get_added_tokens_decoder())
        ids = [token_id for token, token_id in self.tokenizer.get_vocab(with_added_tokens=False).items()
               if token_id not in special and not token.startswith("<0x") and has_other_script_letter(token)]
        return torch.tensor(sorted(ids), dtype=torch.long)


def _compile_template(source: str):
    """A chat template compiled as ``transformers`` compiles it (sandboxed, trimmed blocks, loop controls)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def exact_top(logits, hidden, weight, k: int = 64, bias=None, exact_ids=None, prior=None):
    """``logits`` (..., vocab: approximate, fp32) with their ``k`` highest and ``exact_ids`` recomputed in fp32
    from ``hidden`` (..., hidden size) and the fp32 ``weight`` (vocab, hidden size); in place. ``prior`` (vocab):
    what decoding will add to the logits (e.g. a penalty on some words), counted when choosing the ``k``."""
    ranked = logits if prior is None else logits + prior
    top = ranked.topk(min(int(k), logits.shape[-1]), dim=-1).indices
    if exact_ids is not None and exact_ids.numel():
        top = torch.cat([top, exact_ids.expand(*top.shape[:-1], -1)], dim=-1)
    exact = torch.einsum("...h,...kh->...k", hidden.float(), weight[top])
    if bias is not None:
        exact = exact + bias[top]
    return logits.scatter_(-1, top, exact)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: in fp32, times ``weight`` (``1 + w``, fp32), back to ``x``'s dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).type_as(x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class GemmaChat:
    """A merged Gemma-3 folder, ready to answer: ``answer(conversations, settings, on_text)``.

    The defaults (bf16 layers; int4 output layer, its 256 highest recomputed in fp32) were chosen on the Persian
    study's 64 dev questions with its release model, answered one at a time with the decoding it was registered
    with (ms a token: 64 forced new tokens; "same": answers equal to the fp32 output layer's with the same layers).
    fp32 layers: bf16 output layer 77.9 ms, int8 56.7 ms, both the same 64 answers. bf16 layers: fp32 output layer
    83-86 ms; int8 36-42 ms, same 64; int4 with the top 64 recomputed 32-34 ms but 57 of 64 the same, with the top
    256 31 ms and the same 64. bf16 layers change 14 of the 64 answers against fp32 layers, and score as well by
    the study's measures (chrF++ 18.66 vs 18.61, ended 1.00 vs 1.00, Persian 0.984 vs 0.985; the layers were
    trained under bf16 autocast); int8 layers (33 ms) scored worse (chrF++ 18.00, Persian 0.977) and were not
    taken."""

    def __init__(self, folder: str | Path, body_dtype: str = "bfloat16", head: str = "int4", top_k: int = 256,
                 tokenizer: FolderTokenizer | None = None) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        if (reason := unsupported(folder)) is not None:
            raise ValueError(f"{folder}: {reason}")
        if head not in HEADS or body_dtype not in BODY_DTYPES:
            raise ValueError(f"head must be one of {HEADS} and body_dtype one of {sorted(BODY_DTYPES)}, "
                             f"got {head!r}, {body_dtype!r}")
        self.folder = folder
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.dtype = BODY_DTYPES[body_dtype]
        self.tokenizer = tokenizer or FolderTokenizer(folder)
        index = folder / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                 if index.is_file() else ["model.safetensors"])
        weights: dict[str, torch.Tensor] = {}
        for name in files:
            weights.update(load_file(str(folder / name)))
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
        self.eps = float(config["rms_norm_eps"])
        self.heads, self.kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
        self.head_dim = int(config.get("head_dim") or config["hidden_size"] // self.heads)
        self.scaling = float(config["query_pre_attn_scalar"]) ** -0.5
        self.window = int(config.get("sliding_window") or 0)
        self.layer_types = list(config["layer_types"])
        rope = config["rope_parameters"]
        self.inv_freq = {kind: 1.0 / (float(rope[kind]["rope_theta"]) ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim)) for kind in set(self.layer_types)}
        self.embed = weights["embed_tokens.weight"].float()  # also the output layer when tied; fp32
        self.embed_scale = torch.tensor(float(config["hidden_size"]) ** 0.5)
        head_weight = weights.get("lm_head.weight")
        self.out = self.embed if head_weight is None else head_weight.float()

        def body(name: str) -> torch.Tensor:
            return weights[name].to(self.dtype)

        def norm(name: str) -> torch.Tensor:
            return 1.0 + weights[name].float()

        self.layers = []
        for i in range(int(config["num_hidden_layers"])):
            p = f"layers.{i}."
            self.layers.append({
                "qkv": torch.cat([body(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
                "o": body(p + "self_attn.o_proj.weight"),
                "gate_up": torch.cat([body(p + "mlp.gate_proj.weight"), body(p + "mlp.up_proj.weight")]),
                "down": body(p + "mlp.down_proj.weight"),
                "q_norm": norm(p + "self_attn.q_norm.weight"), "k_norm": norm(p + "self_attn.k_norm.weight"),
                **{n: norm(p + f"{n}.weight") for n in ("input_layernorm", "post_attention_layernorm",
                                                        "pre_feedforward_layernorm", "post_feedforward_layernorm")},
            })
        self.final_norm = norm("norm.weight")
        self.top_k = int(top_k)
        self.head = head
        cached = _read_decode_file(folder)
        if head == "int4":
            if "head_int4" in cached and cached["head_int4"].shape[0] == self.out.shape[0]:
                self.out_low, self.out_scale = cached["head_int4"], cached["head_int4_scales"]
            else:
                self.out_low, self.out_scale = quantize_int4(self.out)
        elif head == "int8":
            self.out_low, self.out_scale = quantize_int8(self.out)
        elif head == "bf16":
            self.out_low = self.out.to(torch.bfloat16)
        self._non_persian = cached.get("non_persian_ids")

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: list, start: int,
                key_valid: torch.Tensor) -> torch.Tensor:
        """The final hidden state of each row's last position: ``ids``/``positions`` (B, T) at cache slots
        ``start .. start+T-1``; ``key_valid`` (B, slots) says which slots hold a real token (not left padding)."""
        batch, length = ids.shape
        end = start + length
        x = F.embedding(ids, self.embed).to(self.dtype) * self.embed_scale.to(self.dtype)
        slots, keys = torch.arange(start, end), torch.arange(end)
        valid = key_valid[:, None, None, :end] & (keys[None, :] <= slots[:, None])[None, None]
        own = (keys[None, :] == slots[:, None])[None, None]  # a padding query sees itself (its output is unused)
        masks = {"full_attention": valid | own}
        if self.window:
            masks["sliding_attention"] = (valid & ((slots[:, None] - keys[None, :]) < self.window)[None, None]) | own
        else:
            masks["sliding_attention"] = masks["full_attention"]
        rope = {}
        for kind, inv_freq in self.inv_freq.items():
            freqs = positions[..., None].float() * inv_freq
            emb = torch.cat((freqs, freqs), dim=-1)
            rope[kind] = (emb.cos().to(self.dtype)[:, None], emb.sin().to(self.dtype)[:, None])
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for layer, kind, (k_cache, v_cache) in zip(self.layers, self.layer_types, cache):
            h = _norm(x, layer["input_layernorm"], self.eps)
            q, k, v = F.linear(h, layer["qkv"]).split((q_size, kv_size, kv_size), dim=-1)
            q = _norm(q.view(batch, length, self.heads, self.head_dim).transpose(1, 2), layer["q_norm"], self.eps)
            k = _norm(k.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2), layer["k_norm"], self.eps)
            cos, sin = rope[kind]
            k_cache[:, :, start:end] = k * cos + _rotate_half(k) * sin
            v_cache[:, :, start:end] = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            attn = F.scaled_dot_product_attention(q * cos + _rotate_half(q) * sin, k_cache[:, :, :end],
                                                  v_cache[:, :, :end], attn_mask=masks[kind], scale=self.scaling,
                                                  enable_gqa=self.heads != self.kv_heads)
            h = F.linear(attn.transpose(1, 2).reshape(batch, length, q_size), layer["o"])
            x = x + _norm(h, layer["post_attention_layernorm"], self.eps)
            gate, up = F.linear(_norm(x, layer["pre_feedforward_layernorm"], self.eps), layer["gate_up"]).chunk(2, -1)
            h = F.linear(F.gelu(gate, approximate="tanh") * up, layer["down"])
            x = x + _norm(h, layer["post_feedforward_layernorm"], self.eps)
        return _norm(x[:, -1], self.final_norm, self.eps)

    def logits(self, hidden: torch.Tensor, exact_ids: torch.Tensor, prior: torch.Tensor | None = None
               ) -> torch.Tensor:
        """fp32 logits (B, vocab) of final hidden states: fp32, or the low-precision layer's with its ``top_k``
        highest (after adding ``prior``, the fixed part of the logits processors) and ``exact_ids`` (the stop
        tokens, which a logits processor may raise) recomputed in fp32."""
        if self.head == "fp32":
            return F.linear(hidden.float(), self.out)
        return exact_top(self.approximate(hidden), hidden, self.out, self.top_k, exact_ids=exact_ids, prior=prior)

    def approximate(self, hidden: torch.Tensor) -> torch.Tensor:
        """The low-precision output layer's logits (fp32 tensor) of final hidden states (B, hidden size)."""
        if self.head == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(hidden.to(torch.bfloat16), self.out_low,
                                                              _int4_group(self.out.shape[1]), self.out_scale).float()
        if self.head == "int8":
            return torch.ops.aten._weight_int8pack_mm(hidden.to(torch.bfloat16), self.out_low, self.out_scale).float()
        if self.head == "bf16":
            return F.linear(hidden.to(torch.bfloat16), self.out_low).float()
        return F.linear(hidden.float(), self.out)

    def other_script_ids(self) -> torch.Tensor:
        if self._non_persian is None:
            self._non_persian = self.tokenizer.non_persian_ids()
        return self._non_persian

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], settings: Mapping[str, Any], stop_ids: Sequence[int],
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Greedy new token ids (B, n) of left-padded ``prompts``, as ``generate`` makes them (finished rows go on
        with the pad id); ``on_token`` gets the prompt ids, then each step's new ids."""
        if (reason := unsupported_settings(settings)) is not None:
            raise ValueError(f"GemmaChat does not decode with {reason}")
        pad = self.tokenizer.pad_token_id
        batch, width = len(prompts), max(len(p) for p in prompts)
        max_new = int(settings.get("max_new_tokens", 48))
        input_ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width + max_new), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):width] = True
        positions = (mask[:, :width].long().cumsum(-1) - 1).masked_fill_(~mask[:, :width], 1)
        cache = [tuple(torch.zeros(batch, self.kv_heads, width + max_new, self.head_dim, dtype=self.dtype)
                       for _ in range(2)) for _ in self.layers]
        stops = torch.tensor(list(stop_ids), dtype=torch.long)
        process, prior = _processors(settings, stops, width, self.other_script_ids, self.out.shape[0])
        if on_token is not None:
            on_token(input_ids)
        hidden = self.forward(input_ids, positions, cache, 0, mask)
        unfinished = torch.ones(batch, dtype=torch.bool)
        new = []
        for step in range(max_new):
            scores = process(input_ids, self.logits(hidden, stops, prior))
            token = torch.where(unfinished, scores.argmax(dim=-1), torch.full((batch,), pad, dtype=torch.long))
            input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
            new.append(token)
            if on_token is not None:
                on_token(token)
            unfinished &= ~torch.isin(token, stops)
            if not unfinished.any() or step == max_new - 1:
                break
            mask[:, width + step] = True
            positions = positions[:, -1:] + 1
            hidden = self.forward(token[:, None], positions, cache, width + step, mask)
        return torch.stack(new, dim=1)

    def answer(self, conversations: Sequence[Sequence[Mapping[str, str]]], settings: Mapping[str, Any],
               on_text: Callable[[str], None] | None = None, with_ended: bool = False):
        """The reply to each conversation (the text before the first stop id), as
        :func:`llm_caption.llm.generation.generate_answers` gives it; ``on_text`` streams a single one."""
        from .generation import _TextCallback, _until_stop

        if on_text is not None and len(conversations) != 1:
            raise ValueError(f"streaming (on_text) answers one conversation at a time, got {len(conversations)}")
        settings = dict(settings)
        stops = self.tokenizer.stop_ids(settings.pop("stop_tokens", None) or ())
        prompts = [self.tokenizer.encode(self.tokenizer.prompt(c)) for c in conversations]
        callback = None if on_text is None else _TextCallback(self.tokenizer, on_text, set(stops))
        new = self.generate(prompts, settings, stops, on_token=None if callback is None else callback.put)
        if callback is not None:
            callback.end()
        answers, ended = [], []
        for row in new:
            kept = _until_stop(row, set(stops))
            answers.append(self.tokenizer.decode(kept).strip())
            ended.append(len(kept) < len(row))
        return (answers, ended) if with_ended else answers


def _processors(settings: Mapping[str, Any], stops: torch.Tensor, prompt_width: int,
                other_script_ids: Callable[[], torch.Tensor], vocab: int
                ) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor | None]:
    """The logits processors ``generate`` builds for ``settings``, in its order and written as ``transformers`` 5
    writes them: repetition penalty, no-repeat n-grams, exponential decay length penalty, then the custom
    other-script penalty (:class:`llm_caption.llm.generation.NonPersianPenalty`); with the fixed part of what they
    add to the logits (the other-script penalty; None without it)."""
    bias = None
    steps: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = []
    penalty = float(settings.get("repetition_penalty") or 1.0)
    if penalty != 1.0:
        def repetition(input_ids, scores):
            score = torch.gather(scores, 1, input_ids)
            score = torch.where(score < 0, score * penalty, score / penalty)
            return scores.scatter(1, input_ids, score)
        steps.append(repetition)
    ngram = int(settings.get("no_repeat_ngram_size") or 0)
    if ngram > 0:
        def no_repeat(input_ids, scores):
            cur_len, size = input_ids.shape[-1], scores.shape[-1]
            if cur_len < ngram:
                return scores
            prefix = input_ids[:, cur_len + 1 - ngram:]
            windows = input_ids.unfold(dimension=1, size=ngram, step=1)
            matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
            banned = scores.new_zeros((scores.shape[0], size + 1), dtype=torch.bool)
            banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=size), size), True)
            return scores.masked_fill(banned[:, :size], -float("inf"))
        steps.append(no_repeat)
    if decay := settings.get("exponential_decay_length_penalty"):
        start, factor = int(decay[0]) + prompt_width, float(decay[1])

        def length_penalty(input_ids, scores):
            cur_len = input_ids.shape[-1]
            if cur_len <= start:
                return scores
            boost = torch.abs(scores[:, stops]) * (math.pow(factor, cur_len - start) - 1)
            penalties = torch.zeros_like(scores)
            penalties[:, stops] = boost.masked_fill(~torch.isfinite(scores[:, stops]), 0.0)
            return scores + penalties
        steps.append(length_penalty)
    if other := float(settings.get("non_persian_penalty") or 0.0):
        ids = other_script_ids()
        bias = torch.zeros(vocab)
        bias[ids[~torch.isin(ids, stops) & (ids < vocab)]] = -other

        def other_scripts(input_ids, scores):
            return scores + bias
        steps.append(other_scripts)

    def process(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for step in steps:
            scores = step(input_ids, scores)
        return scores
    return process, bias


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows with one scale per row (bf16, as ``_weight_int8pack_mm`` takes it)."""
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    return torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous(), scale.to(torch.bfloat16)


def _int4_group(columns: int) -> int:
    return min(INT4_GROUP, columns)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 with a scale and zero per :data:`INT4_GROUP` weights of a row, packed by ``torch`` for its
    CPU int4 kernel: (packed weight, scales and zeros (groups, rows, 2), bf16)."""
    rows, columns = weight.shape
    group = _int4_group(columns)
    grouped = weight.reshape(rows, columns // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale = (high - low).clamp_min(1e-8) / 15
    q = torch.round((grouped - low) / scale).clamp_(0, 15).to(torch.int32).reshape(rows, columns)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
    scales = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales


def _read_decode_file(folder: Path) -> dict[str, torch.Tensor]:
    """The decode file's tensors; an int4 layer packed by another torch version (its packing may differ) is left
    out, and worked out again."""
    path = folder / DECODE_FILE
    if not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        same_torch = (f.metadata() or {}).get("torch") == torch.__version__
        return {k: f.get_tensor(k) for k in f.keys() if same_torch or not k.startswith("head_int4")}


def write_decode_file(folder: str | Path) -> Path:
    """What decoding works out once per model, saved beside its merged weights (:data:`DECODE_FILE`): the int4
    output layer and the ids of other-script tokens (about 1 s each at every start otherwise)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    chat = GemmaChat(folder, head="fp32")
    head, scales = quantize_int4(chat.out)
    path = folder / DECODE_FILE
    save_file({"head_int4": head, "head_int4_scales": scales, "non_persian_ids": chat.tokenizer.non_persian_ids()},
              str(path), metadata={"torch": torch.__version__})
    return path
