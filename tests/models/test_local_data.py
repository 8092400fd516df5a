"""Local data specs: nanoGPT .bin token streams, save_to_disk datasets, image folders of tensors."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lossatlas import trust
from lossatlas.batches import IGNORE_INDEX, as_batches
from lossatlas.errors import UserError
from lossatlas.models import build_data, build_model, check_builder, limit_data_spec, normalize_spec, spec_fingerprint
from lossatlas.models.local_data import describe, with_limits

VOCAB = 50


def write_bin(path, n=1000, dtype=np.uint16, seed=0):
    """A random token stream written as nanoGPT's prepare.py does: arr.tofile(path)."""
    stream = np.random.default_rng(seed).integers(0, VOCAB, n).astype(dtype)
    stream.tofile(path)
    return stream.astype(np.int64)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------------ tokens


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_windows_are_stream_slices_drawn_as_nanogpt_does(tmp_path, monkeypatch, dtype):
    stream = write_bin(tmp_path / "train.bin", dtype=np.dtype(dtype))
    monkeypatch.chdir(tmp_path)  # a relative path is resolved against the working directory
    spec = {"tokens": {"path": "train.bin", "block_size": 8, "dtype": dtype, "max_examples": 20, "seed": 3}}
    data = build_data(spec)
    ids = data.columns["input_ids"]
    assert ids.shape == (20, 9) and ids.dtype == torch.int64
    # nanoGPT get_batch: ix = torch.randint(len(data) - block_size, (batch_size,)) after torch.manual_seed
    torch.manual_seed(3)
    ix = torch.randint(len(stream) - 8, (20,)).numpy()
    for row, i in zip(ids.numpy(), ix):
        assert np.array_equal(row, stream[i : i + 9])
    info = describe(data)
    assert info["path"] == str((tmp_path / "train.bin").resolve()) and info["file_tokens"] == 1000
    assert (info["n_examples"], info["n_tokens"], info["seed"]) == (20, 160, 3)
    # through as_batches: {"input_ids": w} inputs, labels w
    (x, y), = as_batches(data, None)
    assert torch.equal(x["input_ids"], ids) and torch.equal(y, ids)


def test_token_seed_reproduces_and_another_seed_differs(tmp_path):
    write_bin(tmp_path / "t.bin")
    spec = {"tokens": {"path": str(tmp_path / "t.bin"), "block_size": 16, "max_examples": 8}}
    a, b = build_data({**spec, "seed": 5}), build_data({**spec, "seed": 5})
    c = build_data({**spec, "seed": 6})
    assert torch.equal(a.columns["input_ids"], b.columns["input_ids"])
    assert describe(a)["offsets_sha256"] == describe(b)["offsets_sha256"]
    assert not torch.equal(a.columns["input_ids"], c.columns["input_ids"])
    assert describe(a)["offsets_sha256"] != describe(c)["offsets_sha256"]
    # the seed may sit inside the options or at the top: one canonical spec, one fingerprint
    inner = {"tokens": {**spec["tokens"], "seed": 5}}
    assert normalize_spec(inner) == normalize_spec({**spec, "seed": 5})
    assert spec_fingerprint(inner) == spec_fingerprint({**spec, "seed": 5, "kwargs": {}})
    assert normalize_spec(spec)["tokens"]["dtype"] == "uint16"  # defaults filled in


def test_token_pair_layout_is_nanogpt_xy_and_losses_agree(tmp_path):
    stream = write_bin(tmp_path / "t.bin")
    opts = {"path": str(tmp_path / "t.bin"), "block_size": 6, "max_examples": 5}
    x, y = build_data({"tokens": {**opts, "layout": "pair"}, "seed": 1})
    torch.manual_seed(1)
    ix = torch.randint(len(stream) - 6, (5,)).numpy()
    assert np.array_equal(x.numpy(), np.stack([stream[i : i + 6] for i in ix]))
    assert np.array_equal(y.numpy(), np.stack([stream[i + 1 : i + 7] for i in ix]))
    w = build_data({"tokens": opts, "seed": 1}).columns["input_ids"]
    logits = torch.randn(5, 7, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # causal_lm on the 7-token window scores the same 6 terms as cross_entropy on nanoGPT's (x, y)
    from lossatlas.losses import batch_loss

    assert batch_loss("causal_lm", logits, w).item() == pytest.approx(
        batch_loss("cross_entropy", logits[:, :-1], y).item(), rel=1e-14)
    assert batch_loss("cross_entropy", logits[:, :-1], y).item() == pytest.approx(
        F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), y.reshape(-1)).item(), rel=1e-14)


def test_token_limits_sequential_and_default(tmp_path):
    stream = write_bin(tmp_path / "t.bin", n=101)
    path = str(tmp_path / "t.bin")
    data = build_data({"tokens": {"path": path, "block_size": 10, "sampling": "sequential"}})
    ids = data.columns["input_ids"].numpy()
    assert ids.shape == (10, 11)  # (101 − 1) // 10 windows tile the stream
    assert np.array_equal(ids[:, :-1].reshape(-1), stream[:100]) and np.array_equal(ids[:, -1], stream[10:101:10])
    by_tokens = build_data({"tokens": {"path": path, "block_size": 10, "max_tokens": 35, "max_examples": 9}})
    assert describe(by_tokens)["n_examples"] == 3 and describe(by_tokens)["n_tokens"] == 30
    big = build_data({"tokens": {"path": path, "block_size": 10, "max_examples": 9}})
    small = build_data({"tokens": {"path": path, "block_size": 10, "max_examples": 4}})
    assert torch.equal(big.columns["input_ids"][:4], small.columns["input_ids"])  # a smaller subset is a prefix
    seq = build_data({"tokens": {"path": path, "block_size": 10, "sampling": "sequential", "max_examples": 50}})
    assert describe(seq)["n_examples"] == 10  # never more windows than tile the stream


def test_token_bad_input_is_one_line(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 1001)
    write_bin(tmp_path / "short.bin", n=5)
    cases = [
        ({"path": str(tmp_path / "missing.bin"), "block_size": 4}, "missing.bin: no such token file"),
        ({"path": str(tmp_path / "odd.bin"), "block_size": 4}, "not a whole number of uint16 tokens"),
        ({"path": str(tmp_path / "short.bin"), "block_size": 8}, "fewer than block_size + 1 = 9"),
        ({"path": str(tmp_path / "short.bin"), "block_size": 2, "max_tokens": 1}, "below block_size"),
        ({"path": str(tmp_path / "short.bin"), "block_size": 2, "dtype": "int8"}, "choose one of uint16, uint32"),
        ({"path": str(tmp_path / "short.bin")}, "needs 'block_size'"),
        ({"path": str(tmp_path / "short.bin"), "block_size": 0}, "positive integer"),
        ({"path": str(tmp_path / "short.bin"), "block_size": 2, "blocksize": 3}, "unknown tokens option(s) 'blocksize'"),
    ]
    for opts, expected in cases:
        with pytest.raises(UserError) as exc:
            build_data({"tokens": opts})
        assert expected in one_line(exc), (opts, str(exc.value))
    with pytest.raises(UserError, match="reads data, not a model"):
        build_model({"tokens": {"path": "x.bin", "block_size": 2}})
    with pytest.raises(UserError, match="reads data, not a model"):
        check_builder({"tokens": {"path": "x.bin", "block_size": 2}}, "model")
    with pytest.raises(UserError, match="takes no kwargs"):
        normalize_spec({"tokens": {"path": "x.bin", "block_size": 2}, "kwargs": {"n": 1}})
    with pytest.raises(UserError, match="two seeds"):
        normalize_spec({"tokens": {"path": "x.bin", "block_size": 2, "seed": 1}, "seed": 2})


def test_stored_local_specs_need_no_trust(tmp_path):
    write_bin(tmp_path / "t.bin")
    raw = json.dumps({"tokens": {"path": str(tmp_path / "t.bin"), "block_size": 4, "max_examples": 3}})
    stored = trust.stored_spec(raw, None, role="data", source="someone-elses.h5")
    assert isinstance(stored, trust.StoredSpec) and not stored.signed
    trust.require_trusted(stored)  # no factory: nothing imported, nothing to trust
    assert len(build_data(stored)) == 3
    factory = trust.stored_spec(json.dumps({"factory": "os:getcwd"}), None, role="data", source="f.h5")
    with pytest.raises(UserError, match="--trust-factory"):
        trust.require_trusted(factory)


def test_with_limits_tightens_and_refuses_tokens_on_images():
    opts = normalize_spec({"tokens": {"path": "t.bin", "block_size": 4, "max_examples": 10}})["tokens"]
    assert with_limits(opts, "tokens", max_examples=20, max_tokens=8) == {**opts, "max_examples": 10, "max_tokens": 8}
    assert with_limits(opts, "tokens", max_examples=3)["max_examples"] == 3
    spec, applied = limit_data_spec({"tokens": {"path": "t.bin", "block_size": 4}}, max_examples=3, max_tokens=40)
    assert applied and spec["tokens"]["max_examples"] == 3 and spec["tokens"]["max_tokens"] == 40
    named = {"name": "digits"}
    assert limit_data_spec(named, max_examples=3) == (named, False)
    with pytest.raises(UserError, match="--max-tokens applies to token data specs"):
        limit_data_spec(named, max_tokens=3)
    img = normalize_spec({"image_folder": {"path": "imgs"}})["image_folder"]
    with pytest.raises(UserError, match="--max-tokens applies to token data"):
        with_limits(img, "image_folder", max_tokens=5)


# -------------------------------------------------------------------------------------------- hf_dataset


datasets = pytest.importorskip("datasets", reason="hf_dataset specs need the datasets package")
transformers = pytest.importorskip("transformers", reason="tokenizer folders need transformers")

WORDS = ["[PAD]", "[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
TEXTS = ["the cat sat on the mat", "a dog ran", "the dog sat", "a cat", "the mat sat on a dog ran"]


def tokenizer_folder(path, pad=True):
    """A WordLevel tokenizer over WORDS, wrapped for transformers and saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "[PAD]"} if pad else {}
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", **kwargs).save_pretrained(path)
    return path


def ids_of(text):
    return [WORDS.index(w) for w in text.split()]


def test_raw_text_is_tokenized_padded_and_masked(tmp_path, monkeypatch):
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(tmp_path / "ds")
    tokenizer_folder(tmp_path / "tok")
    monkeypatch.chdir(tmp_path)
    data = build_data({"hf_dataset": {"path": "ds", "tokenizer": "tok", "max_length": 5}})
    info = describe(data)
    rows = [ids_of(t)[:5] for t in TEXTS]  # file order: no limit given
    width = max(len(r) for r in rows)
    expected = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    (x, y), = as_batches(data, None)
    assert torch.equal(x["input_ids"], expected) and torch.equal(x["attention_mask"], mask)
    assert torch.equal(y, expected.masked_fill(mask == 0, IGNORE_INDEX))
    assert (y == IGNORE_INDEX).sum() == (mask == 0).sum() > 0
    assert info["task"] == "causal_lm" and info["n_examples"] == 5 and info["n_tokens"] == int(mask.sum())
    assert info["tokenizer"] == str((tmp_path / "tok").resolve()) and info["text_column"] == "text"
    # batches of unequal token counts: the causal_lm loss through as_batches is the mean over counted tokens
    from lossatlas.losses import batch_weights, data_loss

    logits = torch.randn(5, width, len(WORDS), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batches = as_batches(data, 2)
    by_index = iter(range(5))
    value = data_loss("causal_lm", lambda xb: logits[[next(by_index) for _ in range(len(xb["input_ids"]))]], batches,
                      weights=batch_weights("causal_lm", batches))
    terms = [F.cross_entropy(logits[i, t], expected[i, t + 1], reduction="sum")
             for i, r in enumerate(rows) for t in range(len(r) - 1)]
    assert value.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-12)


def test_max_length_padding_and_seeded_subset_with_max_tokens(tmp_path):
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(tmp_path / "ds")
    tokenizer_folder(tmp_path / "tok")
    opts = {"path": str(tmp_path / "ds"), "tokenizer": str(tmp_path / "tok"), "max_length": 6, "padding": "max_length"}
    data = build_data({"hf_dataset": {**opts, "max_examples": 3}, "seed": 2})
    order = torch.randperm(5, generator=torch.Generator().manual_seed(2))[:3].tolist()
    rows = [ids_of(TEXTS[i])[:6] for i in order]
    assert data.columns["input_ids"].shape == (3, 6)
    assert data.columns["input_ids"].tolist() == [r + [0] * (6 - len(r)) for r in rows]
    assert describe(data)["n_tokens"] == sum(map(len, rows))
    again = build_data({"hf_dataset": {**opts, "max_examples": 3}, "seed": 2})
    other = build_data({"hf_dataset": {**opts, "max_examples": 3}, "seed": 4})
    assert describe(again)["indices_sha256"] == describe(data)["indices_sha256"] != describe(other)["indices_sha256"]
    # max_tokens: the longest prefix of the seeded order whose non-padding tokens fit the budget
    full = [len(ids_of(TEXTS[i])[:6]) for i in torch.randperm(5, generator=torch.Generator().manual_seed(2)).tolist()]
    budget = full[0] + full[1]
    capped = build_data({"hf_dataset": {**opts, "max_tokens": budget + full[2] - 1}, "seed": 2})
    assert describe(capped)["n_examples"] == 2 and describe(capped)["n_tokens"] == budget
    with pytest.raises(UserError, match="below the first chosen example"):
        build_data({"hf_dataset": {**opts, "max_tokens": full[0] - 1}, "seed": 2})


def test_pretokenized_columns_and_splits(tmp_path):
    rows = [ids_of(t) for t in TEXTS[:3]]
    labels = [[-100] + r[1:] for r in rows]  # a user's own labels, the first position ignored
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": rows, "labels": labels}),
                               "test": datasets.Dataset.from_dict({"input_ids": rows[:1], "labels": labels[:1]})})
    dd.save_to_disk(tmp_path / "dd")
    with pytest.raises(UserError, match="holds the splits test, train") as exc:
        build_data({"hf_dataset": {"path": str(tmp_path / "dd")}})
    one_line(exc)
    data = build_data({"hf_dataset": {"path": str(tmp_path / "dd"), "split": "train"}})
    width = max(map(len, rows))
    assert data.columns["input_ids"].tolist() == [r + [0] * (width - len(r)) for r in rows]
    assert data.columns["labels"].tolist() == [r + [-100] * (width - len(r)) for r in labels]
    assert data.columns["attention_mask"].sum().item() == sum(map(len, rows))


def test_classification_text_and_images(tmp_path):
    tokenizer_folder(tmp_path / "tok")
    datasets.Dataset.from_dict({"sentence": TEXTS, "label": [0, 1, 1, 0, 1]}).save_to_disk(tmp_path / "cls")
    data = build_data({"hf_dataset": {"path": str(tmp_path / "cls"), "tokenizer": str(tmp_path / "tok"),
                                      "text_column": "sentence"}})
    (x, y), = as_batches(data, None)
    assert y.tolist() == [0, 1, 1, 0, 1] and x["input_ids"][1, :3].tolist() == ids_of(TEXTS[1])
    assert describe(data)["task"] == "classification"
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist()
    first_two = len(ids_of(TEXTS[perm[0]])) + len(ids_of(TEXTS[perm[1]]))
    cut = build_data({"hf_dataset": {"path": str(tmp_path / "cls"), "tokenizer": str(tmp_path / "tok"),
                                     "text_column": "sentence", "max_tokens": first_two}, "seed": 3})
    assert cut.columns["labels"].tolist() == [[0, 1, 1, 0, 1][i] for i in perm[:2]]  # labels follow the kept rows
    assert cut.columns["input_ids"][:, 0].tolist() == [ids_of(TEXTS[i])[0] for i in perm[:2]]
    pixels = np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32)
    datasets.Dataset.from_dict({"pixel_values": pixels.tolist(), "label": [2, 0, 1, 2]}).save_to_disk(tmp_path / "px")
    img = build_data({"hf_dataset": {"path": str(tmp_path / "px"), "max_examples": 3}, "seed": 1})
    order = torch.randperm(4, generator=torch.Generator().manual_seed(1))[:3]
    assert torch.equal(img.columns["pixel_values"], torch.from_numpy(pixels)[order])
    assert img.columns["labels"].tolist() == [[2, 0, 1, 2][i] for i in order]
    PIL = pytest.importorskip("PIL.Image", reason="Image columns need Pillow")
    arrays = [np.random.default_rng(i).integers(0, 256, (3, 4, 3), dtype=np.uint8) for i in range(2)]
    ds = datasets.Dataset.from_dict({"image": [PIL.fromarray(a) for a in arrays], "label": [1, 0]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    ds.save_to_disk(tmp_path / "im")
    pic = build_data({"hf_dataset": {"path": str(tmp_path / "im")}})
    expected = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays])
    assert torch.allclose(pic.columns["pixel_values"], expected, rtol=0, atol=1e-7)


def test_hf_dataset_bad_input_is_one_line(tmp_path):
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    tokenizer_folder(tmp_path / "tok")
    tokenizer_folder(tmp_path / "nopad", pad=False)
    tokenizer_folder(tmp_path / "evil")  # asks for a repository's own tokenizer code: never imported
    config = json.loads((tmp_path / "evil" / "tokenizer_config.json").read_text())
    config.update(auto_map={"AutoTokenizer": ["evil.EvilTok", None]}, tokenizer_class="EvilTok")
    (tmp_path / "evil" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "evil" / "evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w')\n")
    cases = [
        ({"path": str(tmp_path / "nope")}, "nope: no such datasets folder"),
        ({"path": str(tmp_path / "empty")}, "not a folder written by datasets' save_to_disk"),
        ({"path": str(tmp_path / "ds")}, "is raw text; give 'tokenizer'"),
        ({"path": str(tmp_path / "ds"), "tokenizer": str(tmp_path / "notok")}, "no such tokenizer folder"),
        ({"path": str(tmp_path / "ds"), "tokenizer": str(tmp_path / "tok"), "text_column": "body"}, "no column 'body'"),
        ({"path": str(tmp_path / "ds"), "tokenizer": str(tmp_path / "tok"), "padding": "max_length"}, "needs 'max_length'"),
        ({"path": str(tmp_path / "ds"), "task": "classification"}, "no label column 'label'"),
        ({"path": str(tmp_path / "ds"), "split": "train"}, "single Dataset with no splits"),
        ({"path": str(tmp_path / "ds"), "tokenizer": str(tmp_path / "nopad")}, "neither a pad nor an EOS token"),
        ({"path": str(tmp_path / "ds"), "tokenizer": str(tmp_path / "evil")}, "contains custom code"),
    ]
    for opts, expected in cases:
        with pytest.raises(UserError) as exc:
            build_data({"hf_dataset": opts})
        assert expected in one_line(exc), (opts, str(exc.value))
    assert not (tmp_path / "pwned").exists()
    same_length = tmp_path / "same"  # no padding needed: a tokenizer without a pad token is fine
    datasets.Dataset.from_dict({"text": ["the cat", "a dog"]}).save_to_disk(same_length)
    data = build_data({"hf_dataset": {"path": str(same_length), "tokenizer": str(tmp_path / "nopad")}})
    assert data.columns["input_ids"].tolist() == [ids_of("the cat"), ids_of("a dog")]


# ------------------------------------------------------------------------------------------ image_folder


def write_image_folder(root):
    """Classes 'zebra', 'ant', 'cat' (sorted: ant=0, cat=1, zebra=2) of .pt, .npy and .png files."""
    rng = np.random.default_rng(0)
    made = {}
    for cls, n in (("zebra", 2), ("ant", 3), ("cat", 1)):
        (root / cls).mkdir(parents=True)
        for j in range(n):
            arr = rng.normal(size=(1, 3, 3)).astype(np.float32)
            name = f"{j}.npy" if j % 2 else f"{j}.pt"
            if name.endswith(".pt"):
                torch.save(torch.from_numpy(arr), root / cls / name)
            else:
                np.save(root / cls / name, arr)
            made[(cls, name)] = arr
    (root / "ant" / "notes.txt").write_text("ignored")
    return made


def test_image_folder_labels_by_sorted_class_and_seeded_subset(tmp_path):
    made = write_image_folder(tmp_path / "imgs")
    x, y = data = build_data({"image_folder": {"path": str(tmp_path / "imgs")}})
    keys = sorted(made, key=lambda k: (k[0], k[1]))  # class-major, files sorted within a class
    assert torch.equal(x, torch.stack([torch.from_numpy(made[k]) for k in keys]))
    assert y.tolist() == [{"ant": 0, "cat": 1, "zebra": 2}[c] for c, _ in keys]
    info = describe(data)
    assert info["classes"] == ["ant", "cat", "zebra"] and info["class_counts"] == [3, 1, 2] and info["n_files"] == 6
    sub = build_data({"image_folder": {"path": str(tmp_path / "imgs"), "max_examples": 4}, "seed": 7})
    order = torch.randperm(6, generator=torch.Generator().manual_seed(7))[:4]
    assert torch.equal(sub[0], x[order]) and torch.equal(sub[1], y[order])
    assert describe(sub)["n_examples"] == 4 and describe(sub)["seed"] == 7
    assert len(as_batches(sub, 3)) == 2


def test_image_folder_png_through_pil(tmp_path):
    PIL = pytest.importorskip("PIL.Image", reason="png files need Pillow")
    arrays = {"a": np.arange(12, dtype=np.uint8).reshape(2, 2, 3) * 20, "b": np.full((2, 2, 3), 255, np.uint8)}
    for cls, arr in arrays.items():
        (tmp_path / "p" / cls).mkdir(parents=True)
        PIL.fromarray(arr).save(tmp_path / "p" / cls / "0.png")
    x, y = build_data({"image_folder": {"path": str(tmp_path / "p")}})
    expected = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays.values()])
    assert torch.allclose(x, expected, rtol=0, atol=1e-7) and y.tolist() == [0, 1]


def test_image_folder_bad_input_never_runs_pickles(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "obj" / "a").mkdir(parents=True)
    np.save(tmp_path / "obj" / "a" / "0.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    (tmp_path / "pk" / "a").mkdir(parents=True)
    torch.save({"x": Evil()}, tmp_path / "pk" / "a" / "0.pt")
    (tmp_path / "shape" / "a").mkdir(parents=True)
    torch.save(torch.zeros(2), tmp_path / "shape" / "a" / "0.pt")
    torch.save(torch.zeros(3), tmp_path / "shape" / "a" / "1.pt")
    (tmp_path / "flat").mkdir()
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    (tmp_path / "file.bin").write_bytes(b"")
    cases = [
        ("obj", "a/0.npy: cannot be read without pickle"),
        ("pk", "a/0.pt: not a plain tensor file"),
        ("shape", "a/1.pt has shape (3,) but a/0.pt has (2,)"),
        ("flat", "has no class subfolders"),
        ("hollow", "class folder 'a' holds no"),
        ("missing", "missing: no such image folder"),
        ("file.bin", "must be a folder"),
    ]
    for name, expected in cases:
        with pytest.raises(UserError) as exc:
            build_data({"image_folder": {"path": str(tmp_path / name)}})
        assert expected in one_line(exc), (name, str(exc.value))
    assert not marker.exists()


# -------------------------------------------------------------------------------------------- end to end


def test_loss_of_a_tiny_gpt2_on_a_token_file_through_the_cli(tmp_path, monkeypatch, capsys):
    from lossatlas.cli import main

    config = {"n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": VOCAB, "n_positions": 16, "bos_token_id": 0,
              "eos_token_id": 0}
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    model.save_pretrained(tmp_path / "final")
    write_bin(tmp_path / "train.bin", n=500)
    monkeypatch.chdir(tmp_path)
    spec = {"tokens": {"path": "train.bin", "block_size": 8, "max_examples": 12}, "seed": 4}
    assert main(["import", "final", "-o", "run.h5", "--data", json.dumps(spec), "--loss", "causal_lm"]) == 0
    capsys.readouterr()
    assert main(["loss", "run.h5", "--json", "--batch-size", "5"]) == 0
    step = json.loads(capsys.readouterr().out)["steps"][0]
    windows = build_data(spec).columns["input_ids"]  # (12, 9): the same seeded windows the probe used
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1)).item()
    assert step["meta"]["num_examples"] == 12 * 8  # predicted tokens
    assert step["values"]["loss"]["data"] == pytest.approx(expected, rel=1e-5)  # the model computes in float32
