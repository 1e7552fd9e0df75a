"""Training data pipeline: tokenizers, sources, packing, splits, sharding and exact resume."""

import collections
import json
import math
import os

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mimo_jax import data
from mimo_jax.config import ConfigError, from_dict, load_config

BYTES = data.ByteTokenizer()
FAST = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------------------------------------
# helpers


def write_text_corpus(directory, texts):
    directory.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (directory / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    return str(directory)


def distinct_texts(n, seed=0, max_len=300):
    """n different documents of varied lengths (some longer than a row, some tiny)."""
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + "".join(rng.choice(list("abcdefgh xyz\n"), size=int(rng.integers(0, max_len))))
            for i in range(n)]


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def documents_of(batches, tokenizer=BYTES, complete=True):
    """Texts of the documents in an unshuffled row stream: valid tokens concatenated, cut after EOS.

    With complete=False a trailing partial document (an infinite stream cut short) is dropped.
    """
    stream = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches])
    cuts = np.flatnonzero(stream == tokenizer.eos_id) + 1
    if not complete and len(cuts):
        stream = stream[:cuts[-1]]
    assert len(stream) == 0 or stream[-1] == tokenizer.eos_id, "the stream ends inside a document"
    return [tokenizer.decode(piece) for piece in np.split(stream, cuts[:-1])] if len(stream) else []


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def assert_rows_well_formed(batch, seq_len, pad_id):
    ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
    assert ids.shape == seg.shape == pos.shape and ids.shape[1] == seq_len
    assert ids.dtype == seg.dtype == pos.dtype == np.int32
    for row_ids, row_seg, row_pos in zip(ids, seg, pos):
        valid = row_seg > 0
        # padding only at the end of a row, holding the pad id and position 0
        assert not np.any(valid[1:] & ~valid[:-1])
        assert np.all(row_ids[~valid] == pad_id) and np.all(row_pos[~valid] == 0)
        if valid.any():
            n = int(valid.sum())
            s, p = row_seg[:n], row_pos[:n]
            assert s[0] == 1 and np.all(np.diff(s) >= 0) and np.all(np.diff(s) <= 1)
            starts = np.concatenate([[True], np.diff(s) == 1])
            # positions count from 0 within each segment
            expected = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
            np.testing.assert_array_equal(p, expected)


# ---------------------------------------------------------------------------------------------
# config and tokenizers


def test_data_config_from_yaml_mapping():
    cfg = from_dict(data.DataConfig, {"source": "jsonl", "paths": ["a.jsonl", "b/*.jsonl"], "eval_fraction": 0,
                                      "text_field": "content", "num_threads": 2})
    assert cfg.paths == ("a.jsonl", "b/*.jsonl") and cfg.eval_fraction == 0.0 and cfg.text_field == "content"
    assert data.DataConfig().source == "stdlib" and data.DataConfig().tokenizer == "bytes"
    hash(cfg)  # frozen, usable as a static config leaf
    with pytest.raises(ConfigError, match="data.source"):
        data.DataConfig(source="csv")
    with pytest.raises(ConfigError, match="data.paths"):
        data.DataConfig(source="text")
    with pytest.raises(ConfigError, match="eval_fraction"):
        data.DataConfig(eval_fraction=1.5)


@FAST
@given(st.text())
def test_byte_tokenizer_round_trips_unicode(text):
    ids = BYTES.encode(text)
    assert all(BYTES.byte_offset <= i < BYTES.vocab_size for i in ids)
    assert BYTES.decode(ids) == text
    assert BYTES.decode(ids + [BYTES.eos_id, BYTES.pad_id]) == text  # special ids carry no text


def test_byte_tokenizer_ids_fit_tiny_config():
    assert (BYTES.pad_id, BYTES.eos_id, BYTES.bos_id) == (0, 1, 2)
    tiny = load_config("tiny").model
    data.check_tokenizer_fits(BYTES, tiny.vocab_size)
    assert tiny.pad_token_id == BYTES.pad_id
    with pytest.raises(ConfigError, match="vocab_size"):
        data.check_tokenizer_fits(BYTES, 128)


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world", "def foo(): return 1", "héllo ünïcode 😀", "the quick brown fox"] * 5,
                            trainer)
    directory = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(directory / "tokenizer.json"))
    return directory


@FAST
@given(st.text())
def test_hf_tokenizer_round_trips(hf_tokenizer_dir, text):
    tok = data.HFTokenizer(str(hf_tokenizer_dir / "tokenizer.json"))
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(tok.encode_array(text), np.array(ids, np.int32))


def test_hf_tokenizer_special_ids(hf_tokenizer_dir, tmp_path):
    path = str(hf_tokenizer_dir / "tokenizer.json")
    tok = data.make_tokenizer(data.DataConfig(tokenizer=path))
    assert (tok.eos_id, tok.pad_id) == (0, 1) and tok.vocab_size == 300 and tok.bos_id is None
    assert data.HFTokenizer(str(hf_tokenizer_dir), eos_token="<|im_end|>").eos_id == 2  # directory works
    with pytest.raises(data.DataError, match="'<nope>' is not in its vocabulary"):
        data.HFTokenizer(path, eos_token="<nope>")
    # tokenizer_config.json beside tokenizer.json declares the special tokens
    declared = tmp_path / "declared"
    declared.mkdir()
    (declared / "tokenizer.json").write_bytes((hf_tokenizer_dir / "tokenizer.json").read_bytes())
    (declared / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert data.HFTokenizer(str(declared)).eos_id == 2
    with pytest.raises(data.DataError, match="no such file"):
        data.HFTokenizer(str(tmp_path / "missing.json"))


def test_hf_tokenizer_without_eos_needs_config(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(data.DataError, match="data.eos_token"):
        data.HFTokenizer(str(tmp_path / "tokenizer.json"))
    word = data.HFTokenizer(str(tmp_path / "tokenizer.json"), eos_token="b")
    assert word.encode("a b a") == [0, 1, 0] and word.pad_id == word.eos_id == 1


def test_pipeline_with_hf_tokenizer(hf_tokenizer_dir, tmp_path):
    texts = distinct_texts(12, max_len=80)
    cfg = data.DataConfig(source="text", paths=(write_text_corpus(tmp_path / "c", texts),),
                          tokenizer=str(hf_tokenizer_dir), eval_fraction=0.0)
    tok = data.make_tokenizer(cfg)
    batches = list(data.make_dataset(cfg, seq_len=32, batch_size=2, shard_index=0, shard_count=1,
                                     num_epochs=1, shuffle=False))
    for b in batches:
        assert_rows_well_formed(b, 32, tok.pad_id)
    assert documents_of(batches, tok) == texts


# ---------------------------------------------------------------------------------------------
# packing


@FAST
@given(lengths=st.lists(st.integers(0, 70), min_size=1, max_size=25), seq_len=st.integers(1, 40),
       add_bos=st.booleans())
def test_packing_keeps_every_token_once(lengths, seq_len, add_bos):
    texts = ["".join(chr(ord("a") + (d + j) % 26) for j in range(n)) for d, n in enumerate(lengths)]
    encoder = data.DocumentEncoder(BYTES, add_bos=add_bos)
    tokens = grain.MapDataset.source(texts).map(encoder).to_iter_dataset(grain.ReadOptions(num_threads=0))
    rows = list(data.PackedRowsIterDataset(tokens, seq_len=seq_len, pad_id=BYTES.pad_id))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    assert_rows_well_formed(batch, seq_len, BYTES.pad_id)
    valid = batch["segment_ids"] > 0
    # rows are full except the last; the packed stream is exactly the documents, each ending in EOS
    assert valid[:-1].all()
    np.testing.assert_array_equal(batch["input_ids"][valid], np.concatenate([encoder(t) for t in texts]))
    assert np.sum(batch["input_ids"][valid] == BYTES.eos_id) == len(texts)
    # a segment ends a document (EOS last) unless it runs into the row's end, where the document continues
    for ids_row, seg_row in zip(batch["input_ids"], batch["segment_ids"]):
        for s in range(1, seg_row.max() + 1):
            idx = np.flatnonzero(seg_row == s)
            if idx[-1] != seq_len - 1:
                assert ids_row[idx[-1]] == BYTES.eos_id


def test_full_epoch_covers_corpus_exactly_once(tmp_path):
    texts = distinct_texts(40, seed=1)
    cfg = data.DataConfig(source="text", paths=(write_text_corpus(tmp_path / "c", texts),), eval_fraction=0.0,
                          row_shuffle_window=0)
    batches = list(data.make_dataset(cfg, seq_len=48, batch_size=3, shard_index=0, shard_count=1, num_epochs=1))
    for b in batches:
        assert_rows_well_formed(b, 48, BYTES.pad_id)
        assert b["input_ids"].shape == (3, 48)
    docs = documents_of(batches)
    assert sorted(docs) == sorted(texts) and docs != texts  # every document once, in shuffled order
    # with the row shuffle on, rows move but the epoch's tokens stay the same
    shuffled_rows = data.DataConfig(source="text", paths=cfg.paths, eval_fraction=0.0, row_shuffle_window=8)
    batches2 = list(data.make_dataset(shuffled_rows, seq_len=48, batch_size=3, shard_index=0, shard_count=1,
                                      num_epochs=1))
    count = lambda bs: collections.Counter(np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in bs]).tolist())
    assert count(batches2) == count(batches)


def test_eval_stream_is_one_padded_pass(tmp_path):
    texts = distinct_texts(9, seed=2)
    cfg = data.DataConfig(source="text", paths=(write_text_corpus(tmp_path / "c", texts),), eval_fraction=0.5)
    evaluation = list(data.make_dataset(cfg, seq_len=40, batch_size=4, split="eval", shard_index=0, shard_count=1))
    for b in evaluation:
        assert_rows_well_formed(b, 40, BYTES.pad_id)
        assert b["input_ids"].shape == (4, 40)
    eval_docs = documents_of(evaluation)
    train_docs = [BYTES.decode(BYTES.encode(t)) for t in texts if t not in eval_docs]
    assert len(eval_docs) >= data.MIN_EVAL_DOCUMENTS and train_docs
    assert eval_docs == [t for t in texts if t in eval_docs]  # unshuffled: corpus order


# ---------------------------------------------------------------------------------------------
# exact resume


def resume_matches(make, total, stops):
    reference = take(make(), total)
    for stop in stops:
        it = make()
        head = take(it, stop)
        state = json.loads(json.dumps(it.get_state()))  # as grain's Orbax handler stores it
        assert_same_batches(head, reference[:stop])
        fresh = make()
        fresh.set_state(state)
        assert_same_batches(take(fresh, total - stop), reference[stop:])


def test_resume_is_exact_on_stdlib():
    cfg = data.DataConfig(row_shuffle_window=16)
    make = lambda: data.make_dataset(cfg, seq_len=64, batch_size=4, seed=3, shard_index=0, shard_count=1)
    resume_matches(make, total=30, stops=(0, 1, 3, 4, 7, 17, 29))


def test_resume_is_exact_across_epochs(tmp_path):
    # 5 short documents: an epoch lasts a couple of batches, so the stops land in many epochs
    texts = distinct_texts(5, seed=4, max_len=60)
    cfg = data.DataConfig(source="text", paths=(write_text_corpus(tmp_path / "c", texts),), eval_fraction=0.0,
                          row_shuffle_window=5)
    make = lambda: data.make_dataset(cfg, seq_len=24, batch_size=2, seed=5, shard_index=0, shard_count=1)
    resume_matches(make, total=40, stops=(2, 5, 9, 13, 22, 31))
    # the epochs are shuffled differently, and each holds every document
    docs = documents_of(take(data.make_dataset(
        data.DataConfig(source="text", paths=cfg.paths, eval_fraction=0.0, row_shuffle_window=0),
        seq_len=24, batch_size=1, seed=5, shard_index=0, shard_count=1), 60), complete=False)
    epochs = [docs[i:i + 5] for i in range(0, len(docs) - 4, 5)]
    assert len(epochs) >= 4
    assert all(sorted(e) == sorted(texts) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_resume_is_exact_with_threads():
    cfg = data.DataConfig(num_threads=2, prefetch_batches=3, row_shuffle_window=8)
    make = lambda: data.make_dataset(cfg, seq_len=32, batch_size=2, seed=1, shard_index=0, shard_count=1)
    resume_matches(make, total=20, stops=(5, 13))


def test_orbax_checkpoint_round_trip(tmp_path):
    import orbax.checkpoint as ocp

    cfg = data.DataConfig(row_shuffle_window=8)
    make = lambda: data.make_dataset(cfg, seq_len=32, batch_size=2, seed=7, shard_index=0, shard_count=1)
    reference = take(make(), 12)
    it = make()
    take(it, 5)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        restored = make()
        manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same_batches(take(restored, 7), reference[5:])


# ---------------------------------------------------------------------------------------------
# stdlib corpus, splits, determinism, sharding


def test_stdlib_split_is_disjoint_and_stable():
    listing = data.stdlib_files()
    keys = [k for _, k in listing]
    assert keys == sorted(keys) and len(keys) > 100
    assert not any("site-packages" in k or k.startswith("test/") for k in keys)
    cfg = data.DataConfig()
    train, evaluation = data.load_split(cfg, "train"), data.load_split(cfg, "eval")
    train_files = {train.corpus.files[i] for i in train.indices}
    eval_files = {evaluation.corpus.files[i] for i in evaluation.indices}
    assert not train_files & eval_files
    assert len(train_files) + len(eval_files) == len(listing)
    assert data.MIN_EVAL_DOCUMENTS <= len(eval_files) <= 0.05 * len(listing)
    np.testing.assert_array_equal(data.load_split(cfg, "eval").indices, evaluation.indices)


def test_order_is_deterministic_and_seeded():
    cfg = data.DataConfig()
    make = lambda seed: take(data.make_dataset(cfg, seq_len=32, batch_size=2, seed=seed, shard_index=0,
                                               shard_count=1), 3)
    assert_same_batches(make(0), make(0))
    assert not np.array_equal(make(0)[0]["input_ids"], make(1)[0]["input_ids"])


def test_host_shards_partition_each_epoch(tmp_path):
    texts = distinct_texts(21, seed=6)
    cfg = data.DataConfig(source="text", paths=(write_text_corpus(tmp_path / "c", texts),), eval_fraction=0.0,
                          row_shuffle_window=0)

    def epoch(shard_index, shard_count, batch_size):
        batches = list(data.make_dataset(cfg, seq_len=50, batch_size=batch_size, seed=2, shard_index=shard_index,
                                         shard_count=shard_count, num_epochs=1))
        assert all(b["input_ids"].shape == (batch_size // shard_count, 50) for b in batches)
        return documents_of(batches)

    whole = epoch(0, 1, 4)
    first, second = epoch(0, 2, 4), epoch(1, 2, 4)
    assert sorted(whole) == sorted(texts)
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(whole)
    assert abs(len(first) - len(second)) <= 1
    with pytest.raises(ValueError, match="multiple of shard_count"):
        data.make_dataset(cfg, seq_len=50, batch_size=3, shard_index=0, shard_count=2)
    with pytest.raises(ValueError, match="shard_index"):
        data.make_dataset(cfg, seq_len=50, batch_size=4, shard_index=2, shard_count=2)


def test_default_shard_is_this_process():
    it = data.make_dataset(data.DataConfig(), seq_len=16, batch_size=2)  # jax: process 0 of 1
    assert next(it)["input_ids"].shape == (2, 16)


def test_unigram_entropy(tmp_path):
    cfg = data.DataConfig(source="text", paths=(write_text_corpus(tmp_path / "c", ["abab", "aa"]),),
                          eval_fraction=0.0)
    # targets: "bab" + EOS and "a" + EOS -> a:2, b:2, EOS:2
    assert data.unigram_entropy(cfg, split="train") == pytest.approx(math.log(3))
    stdlib = data.unigram_entropy(data.DataConfig())
    assert 2.0 < stdlib < math.log(BYTES.vocab_size)


# ---------------------------------------------------------------------------------------------
# sources and their errors


def test_jsonl_source(tmp_path):
    texts = distinct_texts(10, seed=7) + ["ünïcode 😀 line\nbreak"]
    half = len(texts) // 2
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(texts[:half])))
    (tmp_path / "b.jsonl").write_text(
        "\r\n".join(json.dumps({"body": t}) for t in texts[half:]) + "\r\n\r\n\n", encoding="utf-8")
    cfg = data.DataConfig(source="jsonl", paths=(str(tmp_path),), text_field="body", eval_fraction=0.0)
    corpus = data.load_split(cfg, "train")
    assert [corpus[i] for i in range(len(corpus))] == texts
    batches = list(data.make_dataset(cfg, seq_len=64, batch_size=2, shard_index=0, shard_count=1, num_epochs=1,
                                     shuffle=False))
    assert documents_of(batches) == texts


def test_jsonl_errors_name_file_and_field(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n{"text": "also"}\n')
    missing = tmp_path / "missing_field.jsonl"
    missing.write_text('{"content": "x"}\n')
    with pytest.raises(data.DataError, match=r"missing_field\.jsonl: line 1: no field 'text' \(fields: content\)"):
        data.open_corpus("jsonl", [str(good), str(missing)])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": oops}\n')
    corpus = data.open_corpus("jsonl", [str(broken)])  # the first record is fine
    with pytest.raises(data.DataError, match=r"broken\.jsonl: line 2: not valid JSON"):
        corpus[1]
    # errors surface through the pipeline unchanged
    cfg = data.DataConfig(source="jsonl", paths=(str(broken),), eval_fraction=0.0)
    with pytest.raises(data.DataError, match="broken.jsonl: line 2"):
        list(data.make_dataset(cfg, seq_len=8, batch_size=1, shard_index=0, shard_count=1, num_epochs=1,
                               shuffle=False))
    wrong_type = tmp_path / "number.jsonl"
    wrong_type.write_text('{"text": 3}\n')
    with pytest.raises(data.DataError, match=r"number\.jsonl: line 1: field 'text' is int"):
        data.open_corpus("jsonl", [str(wrong_type)])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(data.DataError, match="no documents in .*empty.jsonl"):
        data.open_corpus("jsonl", [str(empty)])
    with pytest.raises(data.DataError, match="nothing_here"):
        data.open_corpus("jsonl", [str(tmp_path / "nothing_here*.jsonl")])


def test_parquet_source_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = distinct_texts(23, seed=8)
    pq.write_table(pa.table({"content": texts[:13], "n": list(range(13))}), tmp_path / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"content": texts[13:]}), tmp_path / "b.parquet", row_group_size=3)
    cfg = data.DataConfig(source="parquet", paths=(str(tmp_path / "*.parquet"),), text_field="content",
                          eval_fraction=0.0)
    corpus = data.load_split(cfg, "train")
    assert [corpus[i] for i in reversed(range(len(corpus)))] == texts[::-1]  # random access across row groups
    batches = list(data.make_dataset(cfg, seq_len=64, batch_size=2, shard_index=0, shard_count=1, num_epochs=1,
                                     shuffle=False))
    assert documents_of(batches) == texts

    with pytest.raises(data.DataError, match=r"a\.parquet: no column 'text' \(columns: content, n\)"):
        data.open_corpus("parquet", [str(tmp_path / "a.parquet")], "text")
    with pytest.raises(data.DataError, match=r"a\.parquet: column 'n' has type int64"):
        data.open_corpus("parquet", [str(tmp_path / "a.parquet")], "n")
    pq.write_table(pa.table({"text": ["x", None, "z"]}), tmp_path / "nulls.parquet")
    with pytest.raises(data.DataError, match=r"nulls\.parquet: row 1: column 'text' is null"):
        data.open_corpus("parquet", [str(tmp_path / "nulls.parquet")])[1]
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(data.DataError, match=r"fake\.parquet: cannot read as Parquet"):
        data.open_corpus("parquet", [str(tmp_path / "fake.parquet")])


def test_text_source_and_eval_paths(tmp_path):
    train_dir = write_text_corpus(tmp_path / "train", distinct_texts(6, seed=9))
    (tmp_path / "train" / "sub").mkdir()
    (tmp_path / "train" / "sub" / "nested.md").write_text("nested doc")
    (tmp_path / "train" / ".hidden").write_text("skipped")
    eval_file = tmp_path / "held_out.txt"
    eval_file.write_text("held out document")
    cfg = data.DataConfig(source="text", paths=(train_dir,), eval_paths=(str(eval_file),))
    train = data.load_split(cfg, "train")
    assert len(train) == 7 and "nested doc" in [train[i] for i in range(7)]
    evaluation = data.load_split(cfg, "eval")
    assert [evaluation[i] for i in range(len(evaluation))] == ["held out document"]
    overlapping = data.DataConfig(source="text", paths=(train_dir,), eval_paths=(str(tmp_path / "train" / "doc000.txt"),))
    with pytest.raises(data.DataError, match="both data.paths and data.eval_paths"):
        data.load_split(overlapping, "train")
    # a file that disappears after listing is named when read
    corpus = data.open_corpus("text", [train_dir])
    os.remove(corpus.files[0])
    with pytest.raises(data.DataError, match="doc000.txt: cannot read"):
        corpus[0]
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(data.DataError, match="'.*empty_dir': directory has no files"):
        data.open_corpus("text", [str(tmp_path / "empty_dir")])


def test_small_corpus_split_errors(tmp_path):
    cfg = data.DataConfig(source="text", paths=(write_text_corpus(tmp_path / "c", ["one"]),))
    with pytest.raises(data.DataError, match="eval split .* has no documents"):
        data.load_split(cfg, "eval")
    no_eval = data.DataConfig(source="text", paths=cfg.paths, eval_fraction=0.0)
    with pytest.raises(data.DataError, match="eval split"):
        data.make_dataset(no_eval, seq_len=8, batch_size=1, split="eval", shard_index=0, shard_count=1)
    with pytest.raises(data.DataError, match="fewer than the 2 shards"):
        data.make_dataset(no_eval, seq_len=8, batch_size=2, shard_index=0, shard_count=2)
