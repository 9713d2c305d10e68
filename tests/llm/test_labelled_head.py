"""The training loss over labelled positions only (llm/labelled_head.py) computes what the model's own loss
computes, and padding-free batches give every conversation the loss it gets alone: on SmolLM2 (the packaged
model) and on a tiny random Gemma-3 (sliding-window and full attention layers, the real 262,144-word vocabulary)."""

from __future__ import annotations

import copy

import pytest
import torch

from chat_fixtures import persian_conversations
from gemma_fixtures import gemma_tokenizer, tiny_gemma_spec  # noqa: F401 (fixtures)
from llm_caption.llm.chat_format import IGNORE_INDEX, tokenize_conversations
from llm_caption.llm.labelled_head import (PaddingFreeCollator, TailTrimmingCollator, add_labelled_head,
                                           attention_crossover, labelled_nll, trim_unlabelled_tail)
from llm_caption.llm.models import load_model, train_chat_template
from llm_fixtures import base_model, finetuning_cfg, model_spec, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# bf16 autocast: the labelled head and the model's own head both project in bf16 (the same products), so the two
# batch losses differ only by the order of the fp32 reductions; measured ~1e-7 relative, asserted 1e-3.
BF16_RELATIVE_TOLERANCE = 1e-3


def _models(which: str, base_model, tokenizer, model_spec, tiny_gemma_spec, gemma_tokenizer):
    if which == "smollm2":
        return copy.deepcopy(base_model), tokenizer, model_spec
    return load_model(tiny_gemma_spec), gemma_tokenizer, tiny_gemma_spec


@pytest.fixture(params=["smollm2", "tiny_gemma3"])
def model_and_data(request, base_model, tokenizer, model_spec, tiny_gemma_spec, gemma_tokenizer):  # noqa: F811
    model, tok, spec = _models(request.param, base_model, tokenizer, model_spec, tiny_gemma_spec, gemma_tokenizer)
    conversations = persian_conversations(40)[10:]
    data = tokenize_conversations(tok, [(f"c{i}", c) for i, c in enumerate(conversations)],
                                  train_chat_template(spec), 80)
    rows = sorted((dict(data[i]) for i in range(len(data))), key=lambda r: -len(r["input_ids"]))[:4]
    return request.param, model.train(), tok, rows


def _padded_batch(rows, pad_id: int):
    """Right-padded ``input_ids``/``attention_mask``/``labels``; row 2 has no label at all and row 3 only its
    last token labelled (the edge cases of the gather)."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row["labels"])
    labels[2] = IGNORE_INDEX
    last = int(mask[3].sum()) - 1
    labels[3] = IGNORE_INDEX
    labels[3, last] = ids[3, last]
    return ids, mask, labels


def _loss_and_grad(model, probe, **inputs):
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), probe.grad.detach().clone()


def test_labelled_head_equals_the_full_loss_in_fp32_with_empty_and_last_token_rows(model_and_data):
    name, model, tok, rows = model_and_data
    ids, mask, labels = _padded_batch(rows, tok.pad_token_id)
    assert int((labels[:, 1:] != IGNORE_INDEX).sum()) > 1
    add_labelled_head(model)
    probe = model.model.layers[0].mlp.down_proj.weight
    full, full_grad = _loss_and_grad(model, probe, input_ids=ids, attention_mask=mask, labels=labels)
    fast, fast_grad = _loss_and_grad(model, probe, input_ids=ids, attention_mask=mask, labels=labels,
                                     labelled_head=True)
    assert abs(float(fast) - float(full)) <= 1e-5, (name, float(fast), float(full))
    assert torch.allclose(fast_grad, full_grad, rtol=1e-4, atol=1e-6), name
    # A batch with no label at all: a differentiable zero, not an error.
    nothing = torch.full_like(labels, IGNORE_INDEX)
    empty = model(input_ids=ids, attention_mask=mask, labels=nothing, labelled_head=True).loss
    empty.backward()
    assert float(empty.detach()) == 0.0


def test_labelled_head_under_bf16_autocast_is_within_the_stated_tolerance(model_and_data):
    name, model, tok, rows = model_and_data
    ids, mask, labels = _padded_batch(rows, tok.pad_token_id)
    add_labelled_head(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = float(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        fast = float(model(input_ids=ids, attention_mask=mask, labels=labels, labelled_head=True).loss)
    assert abs(fast - full) <= BF16_RELATIVE_TOLERANCE * abs(full), (name, fast, full)


def test_chunked_head_equals_one_projection():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = IGNORE_INDEX
    whole, n_whole = labelled_nll(hidden, labels, head)
    grad_whole = torch.autograd.grad(whole, [hidden, head.weight])
    chunked, n_chunked = labelled_nll(hidden, labels, head, chunk_logits=3 * 50)  # 3 tokens a chunk
    grad_chunked = torch.autograd.grad(chunked, [hidden, head.weight])
    assert int(n_whole) == int(n_chunked) == 13  # shifted: row 0 scores positions 4..8, row 1 all 8
    assert torch.allclose(whole, chunked, atol=1e-5)
    for a, b in zip(grad_whole, grad_chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():  # evaluation: chunks without recomputation
        assert torch.allclose(labelled_nll(hidden, labels, head, chunk_logits=3 * 50)[0], whole, atol=1e-5)


def test_padding_free_batch_gives_each_conversation_its_own_loss(model_and_data):
    """Conversations laid end to end (position ids restarting, no attention mask) score each conversation as
    alone: no token sees another conversation (Gemma's 32-token sliding window included)."""
    name, model, tok, rows = model_and_data
    add_labelled_head(model)
    model.eval()
    if name == "tiny_gemma3":
        assert max(len(r["input_ids"]) for r in rows) > 32  # longer than the sliding window
    # Conversation 0 gets a trailing user turn (unlabelled tokens after its answer): the collator drops it, and
    # the loss is still that of the whole row.
    rows = [dict(r) for r in rows]
    tail = rows[0]["input_ids"][:12]
    rows[0] = {"input_ids": rows[0]["input_ids"] + tail, "labels": rows[0]["labels"] + [IGNORE_INDEX] * len(tail)}
    packed = PaddingFreeCollator()(rows)
    assert packed["input_ids"].shape == (1, sum(len(trim_unlabelled_tail(r)["input_ids"]) for r in rows))
    assert len(trim_unlabelled_tail(rows[0])["input_ids"]) <= len(rows[0]["input_ids"]) - len(tail)
    starts = [0]
    for row in rows:
        starts.append(starts[-1] + len(trim_unlabelled_tail(row)["input_ids"]))
    with torch.no_grad():
        for k, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]),
                          labelled_head=True).loss
            only_k = torch.full_like(packed["labels"], IGNORE_INDEX)
            only_k[0, starts[k]:starts[k + 1]] = packed["labels"][0, starts[k]:starts[k + 1]]
            inside = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], labels=only_k,
                           labelled_head=True).loss
            assert abs(float(inside) - float(alone)) <= 1e-5, (name, k, float(inside), float(alone))


def test_padding_free_collator_starts_every_conversation_unlabelled_trims_tails_and_rejects_ragged_rows():
    batch = PaddingFreeCollator()([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
                                   {"input_ids": [8, 9, 4, 4], "labels": [-100, 9, -100, -100]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert trim_unlabelled_tail({"input_ids": [1, 2, 3], "labels": [-100, -100, -100]})["input_ids"] == [1, 2, 3]
    padded = TailTrimmingCollator(lambda features: features)([{"input_ids": [1, 2, 3], "labels": [-100, 2, -100],
                                                               "extra": 7}])
    assert padded == [{"input_ids": [1, 2], "labels": [-100, 2], "extra": 7}]
    with pytest.raises(ValueError, match="differ in length"):
        PaddingFreeCollator()([{"input_ids": [1, 2], "labels": [1]}])


def test_collator_pads_rows_of_one_length_and_lays_ragged_rows_end_to_end():
    """With a crossover the collator takes the cheaper layout per batch: rows of one length padded (no attention
    over four rows at once), a long row among short ones end to end (no padding for the short ones)."""
    collator = PaddingFreeCollator(pad_token_id=0, crossover=100.0)
    even = [{"input_ids": list(range(1, 41)), "labels": list(range(1, 41))},
            {"input_ids": list(range(1, 39)), "labels": list(range(1, 39))}]
    batch = collator(even)
    assert batch["input_ids"].shape == (2, 40) and "position_ids" not in batch
    assert batch["attention_mask"].tolist()[1] == [1] * 38 + [0, 0]
    assert batch["input_ids"].tolist()[1][-2:] == [0, 0] and batch["labels"].tolist()[1][-2:] == [-100, -100]
    assert batch["labels"].tolist()[0] == list(range(1, 41))  # a padded row keeps its first label (nothing before)
    ragged = [{"input_ids": list(range(1, 41)), "labels": list(range(1, 41))},
              {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]
    assert collator(ragged)["input_ids"].shape == (1, 43)
    assert collator.layouts == {"padding_free": 1, "padded": 1}
    assert PaddingFreeCollator()(even)["input_ids"].shape == (1, 78)  # without a crossover: always end to end


def test_attention_crossover_reads_the_model_config(model_and_data):
    name, model, _, _ = model_and_data
    config = getattr(model.config, "text_config", None) or model.config
    embeddings = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embeddings
    width = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    assert attention_crossover(model) == pytest.approx(body / (2 * 2 * config.num_hidden_layers * width))
    assert attention_crossover(torch.nn.Linear(2, 2)) is None


def test_padded_and_padding_free_layouts_give_the_same_losses(model_and_data):
    """The two layouts of one batch: the same summed loss (fp32, 1e-5 per token) and the same gradients."""
    name, model, tok, rows = model_and_data
    add_labelled_head(model)
    model.eval()
    free = PaddingFreeCollator()(rows)
    padded = PaddingFreeCollator(pad_token_id=tok.pad_token_id or 0, crossover=1e-9)(rows)  # ~all attention: pads
    assert padded["input_ids"].shape[0] == len(rows)
    n = int((free["labels"] != IGNORE_INDEX).sum())
    assert n == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        loss_free = model(**free, labelled_head=True, num_items_in_batch=n).loss
        loss_padded = model(**padded, labelled_head=True, num_items_in_batch=n).loss
    assert abs(float(loss_free) - float(loss_padded)) <= 1e-5, (name, float(loss_free), float(loss_padded))


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning", "loha"])
def test_labelled_head_through_peft_methods_equals_their_own_loss(method, model_and_data, finetuning_cfg):
    """PEFT's prompt learning prefixes virtual tokens (their labels -100) or a key/value cache; LoHa wraps the
    layers: the flag passes through each wrapper and the loss is the model's own (fp32)."""
    from llm_caption.llm.experiment import method_settings
    from llm_caption.llm.methods import MethodContext, build_method

    name, model, tok, rows = model_and_data
    method_cfg, _ = method_settings(finetuning_cfg, method)
    peft_model = build_method(model, method_cfg, MethodContext(tokenizer=tok, seed=0))
    add_labelled_head(peft_model)
    ids, mask, labels = _padded_batch(rows, tok.pad_token_id)
    with torch.no_grad():
        full = float(peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        fast = float(peft_model(input_ids=ids, attention_mask=mask, labels=labels, labelled_head=True).loss)
    assert abs(fast - full) <= 1e-5, (name, method, fast, full)


def test_a_copy_of_a_patched_model_runs_its_own_weights(model_and_data):
    """Generation merges adapters into a deep copy: the copy's forward (without the flag) must use the copy's
    weights, not those of the model it was copied from."""
    import copy

    name, model, _, rows = model_and_data
    add_labelled_head(model)
    twin = copy.deepcopy(model)
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        for p in twin.parameters():
            p.mul_(0.5)
        assert not torch.allclose(twin(input_ids=ids).logits, before), name
        assert torch.equal(model(input_ids=ids).logits, before)
