"""Self-critical sequence training: the CIDEr-D reward against pycocoevalcap, a policy-gradient step that
raises the reward, and resume after a kill during SCST."""

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider

from caption_fixtures import make_caption_inputs
from llm_caption.captioning.decoding import EOS
from llm_caption.captioning.encoder import build_encoder
from llm_caption.captioning.features import extract_features
from llm_caption.captioning.models import build_decoder, caption_loss
from llm_caption.captioning.scst import CiderD, ScstConfig, diversity, sample_captions, scst_step, train_scst
from llm_caption.captioning.training import CaptionData, CaptionSplit, read_checkpoint
from llm_caption.captioning.transforms import build_transform

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH = "show_attend_tell"
KWARGS = {"embed_dim": 16, "hidden_dim": 32, "attention_dim": 16, "feature_proj": 32, "dropout": 0.0}
CFG = dict(epochs=3, batch_images=4, samples=3, lr=1e-3, max_len=10, patience=5, select_by="val_cider_d", seed=5)


def _pycoco(refs, hyps):
    corpus, per_image = Cider().compute_score({str(i): list(r) for i, r in enumerate(refs)},
                                              {str(i): [h] for i, h in enumerate(hyps)})
    return float(corpus), np.asarray(per_image)


def test_cider_d_equals_pycocoevalcap_on_fixed_examples():
    refs = [["a dog runs on the grass", "a brown dog is running", "the dog runs across a field"],
            ["two children play in the snow", "kids playing in snow", "two kids in the snow"],
            ["a man rides a bike", "a person on a bicycle on the road"],
            ["a woman in red", "a lady wearing a red dress walks", "woman walking", "a woman walks down a street",
             "a woman in a red dress"]]
    hyps = ["a dog runs on the grass",      # a reference itself
            "a a a a kids kids snow snow",  # repeated n-grams: clipped against the references
            "",                             # an empty caption scores 0
            "zebra"]                        # a word no reference has, one word (no bigram)
    corpus, per_image = _pycoco(refs, hyps)
    ours = CiderD(refs).score_captions(hyps, range(len(hyps)))
    assert np.abs(ours - per_image).max() <= 1e-6
    assert abs(float(ours.mean()) - corpus) <= 1e-6
    assert ours[2] == 0.0 and ours[0] > ours[1] > 0.0


def test_cider_d_equals_pycocoevalcap_on_a_random_corpus():
    rng = random.Random(11)
    words = [f"w{i}" for i in range(25)] + ["a", "the", "dog"]

    def sentence(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    refs = [[sentence(1, 14) for _ in range(rng.randint(1, 6))] for _ in range(250)]
    hyps = [sentence(0, 16) for _ in range(250)]
    corpus, per_image = _pycoco(refs, hyps)
    ours = CiderD(refs).score_captions(hyps, range(len(hyps)))
    assert np.abs(ours - per_image).max() <= 1e-6
    assert abs(float(ours.mean()) - corpus) <= 1e-6
    assert per_image.std() > 0.05  # the corpus is not degenerate


def test_rewards_use_the_fixed_document_frequencies_and_token_ids():
    refs = [["a dog runs", "a dog is running"], ["a cat sleeps", "the cat is asleep"], ["a dog and a cat"]]
    cider = CiderD(refs).use_vocabulary(["<pad>", "<sos>", "<eos>", "<unk>", "a", "dog", "runs", "cat"])
    by_tokens = cider.score_tokens([[4, 5, 6, EOS, 7, 7], [4, 7, 3]], [0, 1])
    by_text = cider.score_captions(["a dog runs", "a cat <unk>"], [0, 1])
    assert np.allclose(by_tokens, by_text)
    # scoring a subset keeps the document frequencies of all three images (pycocoevalcap on the subset differs)
    alone, _ = _pycoco(refs[:1], ["a dog runs"])
    assert cider.score_captions(["a dog runs"], [0])[0] != pytest.approx(alone)
    with pytest.raises(ValueError, match="image index outside 0..2"):
        cider.score_captions(["a dog"], [3])
    with pytest.raises(ValueError, match="image 1 has no reference caption"):
        CiderD([["a"], []])


def test_end_word_reward_is_cider_d_of_captions_with_an_end_word_and_penalises_cut_off_endings():
    refs = [["a boy is playing in a pool", "a child swims in the pool", "a little boy in the water"],
            ["a dog runs on the grass", "a brown dog is running in a field"]]
    hyps = ["a boy is playing in a", "a boy is playing in a pool", "a dog is running in a", "a dog runs"]
    images = [0, 0, 1, 1]
    with_end = CiderD(refs, end_word="<eos>")
    # exactly coco-caption's CIDEr-D once every caption carries the end word as its last word
    per_hyp_refs = [refs[i] for i in images]
    _, per_image = _pycoco([[r + " <eos>" for r in rs] for rs in per_hyp_refs], [h + " <eos>" for h in hyps])
    ours = CiderD(per_hyp_refs, end_word="<eos>").score_captions(hyps, range(len(hyps)))
    assert np.abs(ours - per_image).max() <= 1e-6
    # the cut-off caption loses more of its reward to the complete one with the end word than without
    plain = CiderD(refs).score_captions(hyps, images)
    ended = with_end.score_captions(hyps, images)
    assert ended[0] / ended[1] < plain[0] / plain[1]
    assert ended[2] < plain[2]  # "... in a" matches no reference's ending
    # token ids: the vocabulary's <eos> cuts the caption, and the end word is added once
    itos = ["<pad>", "<sos>", "<eos>", "<unk>", "a", "boy", "is", "playing", "in", "pool"]
    with_end.use_vocabulary(itos)
    assert with_end.score_tokens([[4, 5, 6, 7, 8, 4, 9, EOS, 5]], [0])[0] == pytest.approx(ended[1])


def test_scst_config_rejects_unknown_or_bad_settings():
    with pytest.raises(ValueError, match="unknown keys"):
        ScstConfig.from_params({"epochz": 2})
    with pytest.raises(ValueError, match="scst.baseline: 'best'"):
        ScstConfig(baseline="best")
    with pytest.raises(ValueError, match="at least 2"):
        ScstConfig(samples=1)
    assert ScstConfig.from_params({"enabled": True, "architecture": None, "epochs": 4}, seed=9).seed == 9
    assert diversity(["a dog", "a dog", "a cat"]) == {"distinct_captions": 2 / 3, "vocab_used": 3.0}


@pytest.fixture(scope="module")
def scst_data(tmp_path_factory):
    """Real encoder grids of 16 synthetic scenes, their caption tensors and training references."""
    root = tmp_path_factory.mktemp("scst")
    inputs = make_caption_inputs(root, n_images=16, image_size=64, max_len=12)
    images, captions = inputs["caption_images"], inputs["captions_encoded"]
    encoder, _ = build_encoder({"name": "efficientnet_lite0"})
    feats, _, _ = extract_features(encoder, images["image_path"].tolist(),
                                   build_transform(inputs["image_transform_spec"]), 16, views=1)
    rows = {image_id: i for i, image_id in enumerate(images["image_id"])}

    def split(name):
        part = captions[captions["split"] == name]
        return CaptionSplit(torch.tensor([rows[i] for i in part["image_id"]]),
                            torch.tensor([list(t) for t in part["token_ids"]]))

    val = captions[captions["split"] == "val"].groupby("image_id")["caption"].apply(list)
    train = captions[captions["split"] == "train"].groupby("image_id")["caption"].apply(list)
    data = CaptionData(torch.from_numpy(feats), split("train"), split("val"), torch.tensor([rows[i] for i in val.index]),
                       val.tolist(), inputs["caption_vocab"]["itos"], key="scst-test")
    path = root / "data.pt"
    torch.save({"features": data.features, "train_rows": data.train.image_rows, "train_tokens": data.train.tokens,
                "val_rows": data.val.image_rows, "val_tokens": data.val.tokens, "val_image_rows": data.val_image_rows,
                "val_references": data.val_references, "itos": data.itos,
                "scst_rows": torch.tensor([rows[i] for i in train.index]), "scst_refs": train.tolist()}, path)
    return path


def load_scst_data(path):
    d = torch.load(path, weights_only=True)
    data = CaptionData(d["features"], CaptionSplit(d["train_rows"], d["train_tokens"]),
                       CaptionSplit(d["val_rows"], d["val_tokens"]), d["val_image_rows"], d["val_references"],
                       d["itos"], key="scst-test")
    return data, d["scst_rows"], d["scst_refs"]


def _model(vocab_size):
    torch.manual_seed(0)
    return build_decoder(ARCH, vocab_size, 1280, **KWARGS)


def _mean_sample_reward(model, feats, cider, images, seed=123, k=16):
    with torch.no_grad():
        tokens, _, _ = sample_captions(model, feats, k, 10, torch.Generator().manual_seed(seed),
                                       torch.autocast("cpu", enabled=False))
    cut = [r[: r.index(EOS)] if EOS in r else r for r in tokens.tolist()]
    return float(cider.score_tokens(cut, np.repeat(images, k)).mean())


def test_scst_steps_move_the_model_towards_higher_reward_captions(scst_data):
    data, rows, refs = load_scst_data(scst_data)
    cider = CiderD(refs).use_vocabulary(data.itos)
    model = _model(len(data.itos))
    images = np.arange(len(rows))
    feats = data.features[rows, 0].float()
    before = _mean_sample_reward(model, feats, cider, images)
    cfg = ScstConfig(samples=6, lr=3e-3, max_len=10, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(1)
    first = scst_step(model, feats, images, cider, cfg, gen, optimizer)
    after_one = _mean_sample_reward(model, feats, cider, images)
    for _ in range(9):
        last = scst_step(model, feats, images, cider, cfg, gen, optimizer)
    after = _mean_sample_reward(model, feats, cider, images)
    assert np.isfinite(first["loss"]) and first["sample_reward"] >= 0.0
    assert after_one > before  # one step already helps
    assert after > after_one and last["sample_reward"] > first["sample_reward"]


def test_greedy_baseline_trains_too(scst_data):
    data, rows, refs = load_scst_data(scst_data)
    cider = CiderD(refs).use_vocabulary(data.itos)
    model = _model(len(data.itos))
    images = np.arange(len(rows))
    feats = data.features[rows, 0].float()
    before = _mean_sample_reward(model, feats, cider, images)
    cfg = ScstConfig(samples=4, lr=3e-3, max_len=10, baseline="greedy", seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        scst_step(model, feats, images, cider, cfg, gen, optimizer)
    assert _mean_sample_reward(model, feats, cider, images) > before


def test_sample_dropout_samples_with_the_decoders_dropout(scst_data):
    """sample_dropout samples in train mode: a decoder with dropout draws other captions from the same generator
    than the test-time policy does; a decoder without dropout draws the same ones."""
    data, rows, refs = load_scst_data(scst_data)
    cider = CiderD(refs).use_vocabulary(data.itos)
    feats, images = data.features[rows, 0].float(), np.arange(len(rows))

    def step(dropout, sample_dropout):
        torch.manual_seed(0)
        model = build_decoder(ARCH, len(data.itos), 1280, **{**KWARGS, "dropout": dropout})
        cfg = ScstConfig(samples=3, max_len=10, sample_dropout=sample_dropout, seed=1)
        out = scst_step(model, feats, images, cider, cfg, torch.Generator().manual_seed(1),
                        torch.optim.Adam(model.parameters(), lr=1e-3))
        return out["sample_reward"], out["loss"]

    assert step(0.0, True) == step(0.0, False)
    assert step(0.5, True) != step(0.5, False)


def _reference_loss(model, data):
    with torch.no_grad():
        return float(caption_loss(model, data.features[data.train.image_rows, 0].float(), data.train.tokens))


def test_mixed_objective_keeps_the_references_likely(scst_data, tmp_path):
    """xe_weight adds the cross-entropy of the training captions: after the same SCST steps the model assigns
    its training captions a lower loss than pure SCST does, and the epoch logs that loss."""
    data, rows, refs = load_scst_data(scst_data)
    cfg = {**CFG, "epochs": 2, "lr": 3e-3}
    losses, results = {}, {}
    for weight in (0.0, 1.0):
        model = _model(len(data.itos))
        results[weight] = train_scst(model, data, rows, refs, ScstConfig(**{**cfg, "xe_weight": weight}),
                                     tmp_path / f"w{weight}")
        model.load_state_dict(read_checkpoint(tmp_path / f"w{weight}" / "last.pt")["model"])  # the last epoch
        losses[weight] = _reference_loss(model, data)
    assert losses[1.0] < losses[0.0]
    assert "xe_loss" not in results[0.0].history[-1]
    assert np.isfinite(results[1.0].history[-1]["xe_loss"]) and results[1.0].history[-1]["xe_loss"] > 0
    with pytest.raises(ValueError, match="xe_weight must be a finite number >= 0"):
        ScstConfig(xe_weight=-0.1)
    cider = CiderD(refs).use_vocabulary(data.itos)
    model = _model(len(data.itos))
    with pytest.raises(ValueError, match="needs one training caption per image"):
        scst_step(model, data.features[rows, 0].float(), np.arange(len(rows)), cider, ScstConfig(xe_weight=0.5),
                  torch.Generator().manual_seed(0), torch.optim.Adam(model.parameters()))


def _strip_times(history):
    """History without timings; NaN (epoch 0 has no training loss) as None so that records compare equal."""
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in h.items() if "time" not in k}
            for h in history]


@pytest.fixture(scope="module")
def scst_full_run(scst_data, tmp_path_factory):
    data, rows, refs = load_scst_data(scst_data)
    model = _model(len(data.itos))
    folder = tmp_path_factory.mktemp("scst_full")
    result = train_scst(model, data, rows, refs, ScstConfig(**CFG), folder)
    return {"result": result, "weights": {k: v.clone() for k, v in model.state_dict().items()}, "dir": folder}


def test_scst_run_logs_every_epoch_and_keeps_the_best(scst_full_run):
    result = scst_full_run["result"]
    history = result.history
    assert [h["epoch"] for h in history] == [0, 1, 2, 3] and result.epochs_run == 3
    for key in ("sample_reward", "greedy_reward", "val_cider_d", "val_bleu4", "val_distinct_captions",
                "val_vocab_used", "val_loss"):
        assert all(key in h for h in history), key
    best = max(history, key=lambda h: h["val_cider_d"])
    assert result.best_epoch == best["epoch"] and result.best_val_bleu4 == best["val_bleu4"]
    saved = torch.load(scst_full_run["dir"] / "best.pt", weights_only=True)
    assert saved["epoch"] == result.best_epoch
    assert all(torch.equal(saved["model"][k], scst_full_run["weights"][k]) for k in saved["model"])
    assert np.isnan(history[0]["sample_reward"]) and all(np.isfinite(h["sample_reward"]) for h in history[1:])


KILLED_DURING_SCST = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path[:0] = [{tests!r}, {helpers!r}]
    from test_scst import load_scst_data, _model
    from llm_caption.captioning.scst import ScstConfig, train_scst
    torch.set_num_threads(int(sys.argv[3]))
    data, rows, refs = load_scst_data(sys.argv[1])
    model = _model(len(data.itos))
    def kill(epoch, record, sample):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    train_scst(model, data, rows, refs, ScstConfig(**{cfg!r}), sys.argv[2], on_epoch_end=kill)
""").format(tests=os.path.dirname(__file__), helpers=os.path.dirname(os.path.dirname(__file__)), cfg=CFG)


def test_resume_after_kill_during_scst_matches_the_uninterrupted_run(scst_data, scst_full_run, tmp_path):
    folder = tmp_path / "resumed"
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_SCST, str(scst_data), str(folder),
                             str(torch.get_num_threads())], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 2
    data, rows, refs = load_scst_data(scst_data)
    model = _model(len(data.itos))
    resumed = train_scst(model, data, rows, refs, ScstConfig(**CFG), folder)
    full = scst_full_run["result"]
    assert resumed.resumed_from_epoch == 2
    assert _strip_times(resumed.history) == _strip_times(full.history)
    assert resumed.best_epoch == full.best_epoch
    for name, value in scst_full_run["weights"].items():
        assert torch.equal(value, model.state_dict()[name]), name


def test_scst_sweep_settings_and_missing_start(tmp_path):
    from llm_caption.captioning.scst_sweep import load_start, parse_settings, parse_variant

    assert parse_settings(["lr=5.0e-5,2.0e-4", "baseline=greedy"]) == [
        ("lr=5.0e-5", {"lr": 5e-5}), ("lr=2.0e-4", {"lr": 2e-4}), ("baseline=greedy", {"baseline": "greedy"})]
    with pytest.raises(ValueError, match="key=value"):
        parse_settings(["lr"])
    assert parse_variant(" batch_images=10  lr=1.0e-4") == ("batch_images=10 lr=1.0e-4", {"batch_images": 10, "lr": 1e-4})
    with pytest.raises(ValueError, match="sets 'lr' twice"):
        parse_variant("lr=1e-4 lr=2e-4")
    with pytest.raises(ValueError, match="key=value key=value"):
        parse_variant("batch_images=10 lr")
    with pytest.raises(FileNotFoundError, match="show_attend_tell/best.pt does not exist"):
        load_start(tmp_path, "show_attend_tell")
    (tmp_path / "show_tell").mkdir()
    torch.save([1, 2], tmp_path / "show_tell" / "best.pt")
    with pytest.raises(ValueError, match="does not hold a captioner's best weights"):
        load_start(tmp_path, "show_tell")
