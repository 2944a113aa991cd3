"""Shard files: cutting a checkpoint for 1..n_heads workers, the file format and manifest,
and the sharded forward pass against the single-process one.

Full tensors come from load_checkpoint, never from slice_weights; the sharded forward
pass is summed and concatenated here by hand.
"""

import hashlib
import json
import mmap
import shutil
import threading
from pathlib import Path

import msgpack
import numpy as np
import pytest

import llmtp.common.formats.shard_file as shard_file
from llmtp.common.formats.checkpoint import load_checkpoint
from llmtp.common.errors import ConfigError, FormatError
from llmtp.common.formats.manifest import load_manifest, verify_embedding, verify_shard
from llmtp.common.model.ops import rmsnorm
from llmtp.common.formats.shard_file import load_embedding, load_shard, write_shards
from llmtp.common.model.slicing import named_matrices, slice_weights
from llmtp.common.model.split import full_slice, plan_split
from llmtp.common.model.transformer import SliceModel, StepSequence
from llmtp.common.model.q8_grouped import GroupedQ8Matrix as QuantizedMatrix
from llmtp.coordinator.shard import describe_manifest, run_shard
from model_factory import make_config, write_random_checkpoint

MODELS_DIR = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = MODELS_DIR / "stories260K" / "stories260K.bin"
needs_stories = pytest.mark.skipif(not STORIES.is_file(), reason=f"{STORIES} not present (shared models folder)")

LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3")
ROW_CUT = ("wq", "w1", "w3")  # concatenated along rows; wk/wv rows per kv head; wo/w2 columns
CONFIG = make_config()  # 6 heads, 2 kv heads, head_dim 8, hidden 100, vocab 67, separate classifier
KINDS = {"fp32": dict(version=1), "int8": dict(version=2, group_size=4)}
PROMPT = [3, 14, 15, 9, 26]
N_DECODE = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: load_checkpoint(write_random_checkpoint(root / f"{kind}.bin", CONFIG, seed=7, **options))
            for kind, options in KINDS.items()}


@pytest.fixture(scope="module")
def sharded(checkpoints, tmp_path_factory):
    """sharded(kind, n) -> manifest of the kind's checkpoint cut for n workers (written once)."""
    root, cache = tmp_path_factory.mktemp("shards"), {}

    def get(kind: str, n_workers: int):
        if (kind, n_workers) not in cache:
            cache[kind, n_workers] = write_shards(checkpoints[kind], n_workers, root / f"{kind}-{n_workers}")
        return cache[kind, n_workers]
    return get


each_kind_and_n = pytest.mark.parametrize("kind,n_workers", [(kind, n) for kind in KINDS
                                                             for n in range(1, CONFIG.n_heads + 1)])


# --- helpers ----------------------------------------------------------------------------

def components(matrix) -> list[np.ndarray]:
    """An fp32 matrix, or an int8 one as [values, scales laid out as (rows, groups)]: each
    component is cut along the same axis as the matrix, so concatenations compare exactly."""
    if isinstance(matrix, QuantizedMatrix):
        return [matrix.values, matrix.scales.reshape(matrix.shape[0], -1)]
    return [matrix]


def assert_concatenation_is_full(full_weights, shards, config):
    """Joining the shards' row/column slices gives back every full tensor exactly."""
    def joined(pieces, axis):
        return [np.concatenate(parts, axis=axis) for parts in zip(*(components(p) for p in pieces))]

    def assert_equal(got, want, what):
        want = components(want)
        assert len(got) == len(want), what
        for got_part, want_part in zip(got, want):
            assert got_part.shape == want_part.shape and np.array_equal(got_part, want_part), what

    for index, full_layer in enumerate(full_weights.layers):
        layers = [shard.weights.layers[index] for shard in shards]
        for name in ("attn_norm", "ffn_norm"):
            for layer in layers:
                assert np.array_equal(getattr(layer, name), getattr(full_layer, name)), name
        for name in ROW_CUT:
            assert_equal(joined([getattr(layer, name) for layer in layers], 0), getattr(full_layer, name), name)
        for name in ("wo", "w2"):
            assert_equal(joined([getattr(layer, name) for layer in layers], 1), getattr(full_layer, name), name)
        for name in ("wk", "wv"):
            # a kv head shared by several workers is replicated: every copy must be the same rows
            by_kv_head = {}
            for shard, layer in zip(shards, layers):
                rows = [part.reshape(shard.spec.n_kv_heads_local, config.head_dim, -1)
                        for part in components(getattr(layer, name))]
                for local in range(shard.spec.n_kv_heads_local):
                    head = [part[local] for part in rows]
                    kv_head = shard.spec.kv_heads[0] + local
                    if kv_head in by_kv_head:
                        assert all(np.array_equal(a, b) for a, b in zip(head, by_kv_head[kv_head])), name
                    by_kv_head[kv_head] = head
            assert sorted(by_kv_head) == list(range(config.n_kv_heads)), name
            assert_equal([np.concatenate(parts) for parts in zip(*(by_kv_head[h] for h in sorted(by_kv_head)))],
                         getattr(full_layer, name), name)
    for shard in shards:
        assert np.array_equal(shard.weights.final_norm, full_weights.final_norm)
    assert_equal(joined([shard.weights.classifier for shard in shards], 0), full_weights.classifier, "classifier")


def file_backed(array: np.ndarray) -> bool:
    while array is not None:
        if isinstance(array, memoryview):
            array = array.obj
        if isinstance(array, (np.memmap, mmap.mmap)):
            return True
        array = array.base if isinstance(array, np.ndarray) else None
    return False


def shard_arrays(shard):
    for layer in shard.weights.layers:
        for name in LAYER_FIELDS:
            yield from components_raw(getattr(layer, name))
    yield shard.weights.final_norm
    yield from components_raw(shard.weights.classifier)


def components_raw(matrix):
    return [matrix.values, matrix.scales] if isinstance(matrix, QuantizedMatrix) else [matrix]


def embed(table, tokens):
    tokens = np.asarray(tokens, dtype=np.int64)
    if isinstance(table, QuantizedMatrix):
        return table.dequantize_rows(tokens)
    return np.asarray(table[tokens], dtype=np.float32)


def lockstep_logits(models, x, sequences):
    """The sharded forward pass by hand: sum the row-parallel partials, concatenate logits."""
    positions = np.concatenate([np.arange(s.start_position, s.start_position + s.n_tokens) for s in sequences])
    def in_worker_order(partials):  # a v2 file's partials are runq.c's per-group terms: folded in order
        running = None
        for model, partial in zip(models, partials):
            running = model.numerics.fold(partial, running)
        return running

    for layer in range(models[0].config.n_layers):
        x = x + in_worker_order([model.attention_partial(layer, x, sequences, positions) for model in models])
        x = x + in_worker_order([model.ffn_partial(layer, x) for model in models])
    h = models[0].numerics.rmsnorm(x[-1:], models[0].weights.final_norm)
    return np.concatenate([model.matmul(h, model.weights.classifier) for model in models], axis=1)


def assert_sharded_run_matches(checkpoint, manifest, prompt=PROMPT, n_decode=N_DECODE):
    """A prefill then greedy decode steps: every step's logits agree within 1e-5."""
    config = checkpoint.config
    full = SliceModel(config, full_slice(config), checkpoint.weights.as_shard())
    shards = [load_shard(manifest.shard_path(i)) for i in range(manifest.n_workers)]
    models = [SliceModel(shard.config, shard.spec, shard.weights) for shard in shards]
    table = load_embedding(manifest)
    tokens, position = list(prompt), 0
    for _ in range(1 + n_decode):
        sequences = [StepSequence(slot=0, start_position=position, n_tokens=len(tokens))]
        want = full.forward(checkpoint.weights.embed(np.array(tokens)), sequences)
        got = lockstep_logits(models, embed(table, tokens), sequences)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        position += len(tokens)
        tokens = [int(np.argmax(want[-1]))]


def rewrite_header(path: Path, mutate) -> None:
    """Re-pack a shard file's msgpack header after `mutate(header)`, keeping the data where it was."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[12:16], "little")
    header = msgpack.unpackb(raw[16:16 + length])
    data_start = min(t["offset"] for t in header["tensors"])
    mutate(header)
    packed = msgpack.packb(header)
    assert 16 + len(packed) <= data_start
    path.write_bytes(raw[:12] + len(packed).to_bytes(4, "little") + packed
                     + bytes(data_start - 16 - len(packed)) + raw[data_start:])


def assert_one_line_naming(error, path: Path, *words):
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message


# --- cutting ------------------------------------------------------------------------------

@each_kind_and_n
def test_shards_concatenate_to_the_full_tensors(checkpoints, sharded, kind, n_workers):
    manifest = sharded(kind, n_workers)
    shards = [load_shard(manifest.shard_path(i)) for i in range(n_workers)]
    assert [shard.spec for shard in shards] == plan_split(CONFIG, n_workers, KINDS[kind].get("group_size", 1))
    assert_concatenation_is_full(checkpoints[kind].weights, shards, CONFIG)
    for shard in shards:
        assert shard.model_sha256 == manifest.source_sha256
        assert shard.group_size == KINDS[kind].get("group_size")
        for array in shard_arrays(shard):
            assert file_backed(array) and array.flags.c_contiguous and not array.flags.writeable


def tensor_by_key(weights, key):
    if key.startswith("layers."):
        _, index, name = key.split(".")
        return getattr(weights.layers[int(index)], name)
    return getattr(weights, key)


def as_float(tensor) -> np.ndarray:
    """Expanded elementwise from the stored numbers (the same numbers give the same floats)."""
    return tensor.dequantize() if hasattr(tensor, "dequantize") else np.asarray(tensor)


@each_kind_and_n
def test_every_table_entry_reassembles_from_its_shards(checkpoints, sharded, kind, n_workers):
    """Driven by the tensor table, so a new entry is checked too: each worker's piece, put back at
    its spec's range (replicated kv heads must agree), covers the full tensor exactly."""
    from llmtp.common.model.tensors import TENSORS, unit_count
    manifest, full = sharded(kind, n_workers), checkpoints[kind].weights
    shards = [load_shard(manifest.shard_path(i)) for i in range(n_workers)]
    for info in TENSORS:
        keys = [f"layers.{i}.{info.name}" for i in range(CONFIG.n_layers)] if info.per_layer else [info.name]
        for key in keys:
            want = as_float(tensor_by_key(full, key))
            assert want.shape == info.shape(CONFIG), key
            if not info.in_shards:
                assert np.array_equal(as_float(load_embedding(manifest)), want), key
                continue
            pieces = [(shard.spec, tensor_by_key(shard.weights, key)) for shard in shards]
            if info.cut_axis is None:
                assert all(np.array_equal(as_float(piece), want) for _, piece in pieces), key
                continue
            per_unit = want.shape[info.cut_axis] // unit_count(info.cut_unit, CONFIG)
            got = np.full(want.shape, np.nan, dtype=np.float32)
            for spec, piece in pieces:
                start, stop = (n * per_unit for n in spec.unit_range(info.cut_unit))
                where = (slice(start, stop), slice(None)) if info.cut_axis == 0 else (slice(None), slice(start, stop))
                already = got[where]
                piece = as_float(piece)
                assert np.all(np.isnan(already) | (already == piece)), key  # replicas agree
                got[where] = piece
            assert np.array_equal(got, want), key
            if kind == "int8" and info.is_matrix:
                assert all(piece.encoding == tensor_by_key(full, key).encoding for _, piece in pieces), key


@each_kind_and_n
def test_sharded_forward_matches_single_process(checkpoints, sharded, kind, n_workers):
    assert_sharded_run_matches(checkpoints[kind], sharded(kind, n_workers))


def test_six_heads_over_four_workers(sharded):
    manifest = sharded("fp32", 4)
    shards = [load_shard(manifest.shard_path(i)) for i in range(4)]
    assert [s.spec.n_heads_local for s in shards] == [2, 2, 1, 1]
    assert [s.weights.layers[0].wq.shape[0] // CONFIG.head_dim for s in shards] == [2, 2, 1, 1]
    assert [s.weights.layers[0].wo.shape for s in shards] == [(48, 16), (48, 16), (48, 8), (48, 8)]
    assert [s.spec.kv_heads for s in shards] == [(0, 1), (0, 2), (1, 2), (1, 2)]  # worker 1 reads both


def test_slice_weights_matches_the_written_shard(checkpoints, sharded):
    manifest = sharded("int8", 3)
    spec = manifest.shards[1].spec
    in_memory = slice_weights(checkpoints["int8"].weights, spec, CONFIG)
    on_disk = load_shard(manifest.shard_path(1)).weights
    for got, want in zip(named_matrices(on_disk), named_matrices(in_memory)):
        for a, b in zip(components(got[1]), components(want[1])):
            assert np.array_equal(a, b), got[0]


def test_threads_with_allreduce_callback_match(checkpoints, sharded):
    """The same run through SliceModel.forward's allreduce hook, one thread per shard."""
    manifest, checkpoint = sharded("int8", 4), checkpoints["int8"]
    shards = [load_shard(manifest.shard_path(i)) for i in range(4)]
    models = [SliceModel(s.config, s.spec, s.weights) for s in shards]
    partials, barrier = [None] * 4, threading.Barrier(4, timeout=10)

    def allreduce_for(index):
        def allreduce(partial):
            partials[index] = partial
            barrier.wait()
            total = sum(partials[1:], partials[0])
            barrier.wait()  # nobody overwrites partials before all have summed
            return total
        return allreduce

    x = checkpoint.weights.embed(np.array(PROMPT))
    sequences = [StepSequence(slot=0, start_position=0, n_tokens=len(PROMPT))]
    results = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, models[i].forward(x, sequences, allreduce_for(i)))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    full = SliceModel(CONFIG, full_slice(CONFIG), checkpoint.weights.as_shard()).forward(x, sequences)
    np.testing.assert_allclose(np.concatenate(results, axis=1), full, rtol=0, atol=1e-5)


def test_embedding_file_is_the_checkpoint_table(checkpoints, sharded):
    for kind in KINDS:
        table = load_embedding(sharded(kind, 2).directory)
        want = checkpoints[kind].weights.token_embedding
        assert all(np.array_equal(a, b) for a, b in zip(components(table), components(want)))
        assert all(file_backed(a) for a in components_raw(table))


def test_int8_heads_must_fall_on_group_boundaries(tmp_path):
    config = make_config(hidden_dim=96)  # head_dim 8, group_size 16
    checkpoint = load_checkpoint(write_random_checkpoint(tmp_path / "m.bin", config, seed=1, version=2,
                                                         group_size=16))
    with pytest.raises(ConfigError) as error:
        write_shards(checkpoint, 2, tmp_path / "two")  # 3 heads each: wo cut at column 24
    assert "head_dim 8" in str(error.value) and "group_size 16" in str(error.value)
    assert not (tmp_path / "two").exists()
    manifest = write_shards(checkpoint, 3, tmp_path / "three")  # 2 heads each: columns 16, 32
    shards = [load_shard(manifest.shard_path(i)) for i in range(3)]
    assert_concatenation_is_full(checkpoint.weights, shards, config)


@pytest.mark.parametrize("n_workers", [0, 7, -1])
def test_run_shard_refuses_worker_counts_outside_heads(checkpoints, tmp_path, n_workers):
    with pytest.raises(ConfigError, match="n_heads=6"):
        run_shard(checkpoints["fp32"].path, n_workers, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- manifest and progress ----------------------------------------------------------------

def test_manifest_records_sources_files_and_hashes(checkpoints, sharded):
    manifest = sharded("int8", 4)
    data = json.loads((manifest.directory / "manifest.json").read_text())
    assert data["n_workers"] == 4 and data["group_size"] == 4 and data["format_version"] == 1
    source = checkpoints["int8"].path
    assert data["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert data["source"]["n_bytes"] == source.stat().st_size
    for index, entry in enumerate(data["shards"]):
        path = manifest.directory / f"shard-{index}-of-4.bin"
        assert entry["file"] == path.name and entry["index"] == index
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["n_bytes"] == path.stat().st_size
    assert data["embedding"]["file"] == "embedding.bin"
    assert load_manifest(manifest.directory) == manifest
    written = [p.name for p in manifest.directory.iterdir() if not p.name.startswith(".")]  # not the stamps
    assert sorted(written) == [
        "embedding.bin", "manifest.json"] + [f"shard-{i}-of-4.bin" for i in range(4)]
    for index in range(4):
        verify_shard(manifest, index)
    verify_embedding(manifest)
    assert "shard-3-of-4.bin: heads 5..5" in describe_manifest(manifest)


def test_progress_bar_only_for_large_models_or_a_tty(checkpoints, tmp_path, capsys, monkeypatch):
    write_shards(checkpoints["fp32"], 2, tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(shard_file, "PROGRESS_MIN_BYTES", 0)
    write_shards(checkpoints["fp32"], 2, tmp_path / "logged")  # stderr is captured: no terminal
    err = capsys.readouterr().err
    assert "\r" not in err and "shard: 100% written (embedding)\n" in err and len(err.splitlines()) <= 5
    monkeypatch.setattr(shard_file.sys.stderr, "isatty", lambda: True)
    write_shards(checkpoints["fp32"], 2, tmp_path / "loud")
    err = capsys.readouterr().err
    assert "\r[" in err and "shard 2/2" in err and "100% embedding" in err and err.endswith("\n")
    write_shards(checkpoints["fp32"], 2, tmp_path / "off", progress=False)
    assert capsys.readouterr().err == ""


def copy_manifest_dir(manifest, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(manifest.directory, target)
    return target


@pytest.mark.parametrize("edit,words", [
    (lambda d: d.pop("n_workers"), ["'n_workers'"]),
    (lambda d: d.update(format_version=9), ["format_version 9"]),
    (lambda d: d["shards"][1].update(sha256="xyz"), ["shards[1]", "sha256"]),
    (lambda d: d["shards"][0].update(file="../evil.bin"), ["shards[0]", "plain file name"]),
    (lambda d: d["shards"].pop(), ["2 shards listed"]),
    (lambda d: d["shards"][2]["spec"].update(vocab=[40, 67]), ["vocab starts at 40"]),
    (lambda d: d["config"].update(extra=1), ["extra"]),
    (lambda d: d["embedding"].update(n_bytes="big"), ["embedding", "'n_bytes'"]),
])
def test_malformed_manifest_is_a_one_line_format_error(sharded, tmp_path, edit, words):
    path = copy_manifest_dir(sharded("fp32", 3), tmp_path) / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError) as error:
        load_manifest(path)
    assert_one_line_naming(error, path, *words)


def test_manifest_that_is_not_json(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(FormatError) as error:
        load_manifest(tmp_path)
    assert_one_line_naming(error, path, "not valid JSON")


# --- shard file validation ----------------------------------------------------------------

def _truncate(path):
    path.write_bytes(path.read_bytes()[:-1])


def _append(path):
    path.write_bytes(path.read_bytes() + b"\0")


def _patch(offset, data):
    def patch(path):
        raw = bytearray(path.read_bytes())
        raw[offset:offset + len(data)] = data
        path.write_bytes(bytes(raw))
    return patch


def _header(mutate):
    return lambda path: rewrite_header(path, mutate)


def _set_tensor(tensor, **fields):
    return _header(lambda h: next(t for t in h["tensors"] if t["name"] == tensor).update(fields))


@pytest.mark.parametrize("damage,words", [
    (_patch(0, b"GGUF"), ["not a shard file"]),
    (_patch(8, (7).to_bytes(4, "little")), ["format version 7"]),
    (_patch(12, (1 << 30).to_bytes(4, "little")), ["header length"]),
    (_patch(16, b"\xc1\xc1\xc1"), ["not valid msgpack"]),
    (_truncate, ["truncated"]),
    (_append, ["its tensors end at"]),
    (_set_tensor("layers.1.w2", shape=[33, 48]), ["layers.1.w2", "expected float32 (48, 33)"]),
    (_set_tensor("layers.1.w2", shape=[48, 40]), ["final_norm", "overlaps"]),  # w2 is stored last in a layer
    (_set_tensor("layers.0.wq", dtype="float16"), ["layers.0.wq", "dtype"]),
    (_set_tensor("final_norm", offset=100), ["final_norm", "aligned"]),
    (_set_tensor("classifier", name="lm_head"), ["classifier is missing"]),
    (_header(lambda h: h["spec"].update(kv_heads=[0, 1])), ["kv_heads"]),
    (_header(lambda h: h["config"].update(n_heads=5)), ["dim 48 is not divisible by n_heads 5"]),
    (_header(lambda h: h.pop("model_sha256")), ["model_sha256"]),
])
def test_damaged_shard_is_a_one_line_format_error(sharded, tmp_path, damage, words):
    path = copy_manifest_dir(sharded("fp32", 3), tmp_path) / "shard-1-of-3.bin"
    load_shard(path)
    damage(path)
    with pytest.raises(FormatError) as error:
        load_shard(path)
    assert_one_line_naming(error, path, *words)


def test_damaged_int8_shard_names_the_scales(sharded, tmp_path):
    path = copy_manifest_dir(sharded("int8", 2), tmp_path) / "shard-0-of-2.bin"
    rewrite_header(path, lambda h: next(t for t in h["tensors"] if t["name"] == "layers.0.wo.scales")
                   .update(shape=[10]))
    with pytest.raises(FormatError) as error:
        load_shard(path)
    assert_one_line_naming(error, path, "layers.0.wo.scales", "expected float32 (288,)")


def test_embedding_file_is_not_a_shard(sharded):
    manifest = sharded("fp32", 2)
    with pytest.raises(FormatError) as error:
        load_shard(manifest.embedding_path)
    assert_one_line_naming(error, manifest.embedding_path, "'embedding'", "expected 'shard'")


# --- stories260K --------------------------------------------------------------------------

@needs_stories
@pytest.mark.parametrize("n_workers", [2, 8])
def test_stories260k(tmp_path, n_workers):
    manifest = run_shard(STORIES, n_workers, tmp_path / "shards")
    checkpoint = load_checkpoint(STORIES)
    assert manifest.source_sha256 == hashlib.sha256(STORIES.read_bytes()).hexdigest()
    assert manifest.source_n_bytes == STORIES.stat().st_size and manifest.group_size is None
    shards = [load_shard(manifest.shard_path(i)) for i in range(n_workers)]
    assert_concatenation_is_full(checkpoint.weights, shards, checkpoint.config)
    assert_sharded_run_matches(checkpoint, manifest, prompt=[1, 403, 407, 261, 378], n_decode=2)
    for index in range(n_workers):
        verify_shard(manifest, index)

    path = manifest.shard_path(1)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError) as error:
        verify_shard(manifest, 1)
    assert_one_line_naming(error, path, "sha256", manifest.shards[1].sha256)

    path.write_bytes(bytes(raw[:-100]))
    with pytest.raises(FormatError) as error:
        verify_shard(manifest, 1)
    assert_one_line_naming(error, path, f"size is {len(raw) - 100} bytes", f"manifest says {len(raw)}")
    with pytest.raises(FormatError) as error:
        load_shard(path)
    assert_one_line_naming(error, path, "truncated")


# --- layer ranges -------------------------------------------------------------------------

def test_specs_name_their_layer_range_and_older_files_mean_all_layers(sharded, tmp_path):
    manifest = sharded("fp32", 3)
    assert all(spec.layers == (0, CONFIG.n_layers) for spec in manifest.specs)
    data = json.loads((manifest.directory / "manifest.json").read_text())
    assert all(entry["spec"]["layers"] == [0, CONFIG.n_layers] for entry in data["shards"])
    assert load_shard(manifest.shard_path(1)).spec.layers == (0, CONFIG.n_layers)

    path = copy_manifest_dir(manifest, tmp_path) / "manifest.json"  # as written before specs had layers
    for entry in data["shards"]:
        del entry["spec"]["layers"]
    path.write_text(json.dumps(data))
    assert load_manifest(path).specs == manifest.specs
    shard_path = path.parent / "shard-1-of-3.bin"
    rewrite_header(shard_path, lambda h: h["spec"].pop("layers"))
    assert load_shard(shard_path).spec == manifest.specs[1]


@pytest.mark.parametrize("layers,words", [([0, 1], ["spec.layers 0..1", "not all 2 layers"]),
                                          ([0, 3], ["spec.layers 0..3", "outside 0..2"])])
def test_a_spec_with_part_of_the_layers_is_refused(sharded, tmp_path, layers, words):
    path = copy_manifest_dir(sharded("fp32", 2), tmp_path) / "shard-0-of-2.bin"
    rewrite_header(path, lambda h: h["spec"].update(layers=layers))
    with pytest.raises(FormatError) as error:
        load_shard(path)
    assert_one_line_naming(error, path, *words)


# --- matrix encodings in shard headers -----------------------------------------------------

@pytest.mark.parametrize("mutate,words", [
    (lambda e: e.update({"layers.0.wq": {"type": "q3_magic"}}), ["layers.0.wq", "matrix type 'q3_magic' is unknown"]),
    (lambda e: e.update({"layers.0.wo": {"type": "q8_grouped", "group_size": 5}}),
     ["layers.0.wo", "group_size 5 does not divide"]),
    (lambda e: e.update({"layers.0.wo": {"type": "q8_grouped", "group_size": True}}), ["group_size", "not an integer"]),
    (lambda e: e.pop("classifier"), ["'encodings' has no entry for tensor classifier"]),
    (lambda e: e.update({"layers.1.w1": "f32"}), ["layers.1.w1", "not a map"]),
])
def test_damaged_matrix_encodings_are_one_line_format_errors(sharded, tmp_path, mutate, words):
    path = copy_manifest_dir(sharded("int8", 2), tmp_path) / "shard-0-of-2.bin"
    assert load_shard(path).weights.layers[0].wq.encoding.to_dict() == {"type": "q8_grouped", "group_size": 4}
    rewrite_header(path, lambda h: mutate(h["encodings"]))
    with pytest.raises(FormatError) as error:
        load_shard(path)
    assert_one_line_naming(error, path, *words)


def test_shards_written_before_encodings_read_as_before(sharded, tmp_path):
    for kind in KINDS:
        path = copy_manifest_dir(sharded(kind, 2), tmp_path / kind) / "shard-1-of-2.bin"
        want = load_shard(path).weights
        rewrite_header(path, lambda h: h.pop("encodings"))
        got = load_shard(path).weights
        for (name, a), (_, b) in zip(named_matrices(got), named_matrices(want), strict=True):
            assert type(a) is type(b) and all(np.array_equal(x, y) for x, y in zip(components(a), components(b))), name
