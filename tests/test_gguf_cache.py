"""The GGUF conversion cache: a GGUF file is converted once into a safetensors folder keyed by
its content hash, later loads read the folder, damaged conversions are redone, concurrent
conversions never corrupt each other, and the converted model is the GGUF model."""
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from lems_core import gguf_cache
from lems_core.cache import sha256_file
from lems_core.gguf_cache import (HASH_MEMO, MARKER, ConversionError, check_reload_identical, convert_gguf,
                                  converted_folder, memoised_sha256)
from lems_core.model import load_model, model_fingerprint

TEXT = "the cat saw the hat, then the dog"


def write_tiny_gguf(path, seed=0, layers=2, hidden=64, ff=160, heads=4, kv_heads=2):
    """A tiny random llama GGUF (fp32 tensors, byte-level BPE tokenizer) written with gguf-py."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
              "output.weight": (len(tokens), hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in {
            "attn_norm.weight": (hidden,), "ffn_norm.weight": (hidden,), "attn_q.weight": (hidden, hidden),
            "attn_k.weight": (kv, hidden), "attn_v.weight": (kv, hidden), "attn_output.weight": (hidden, hidden),
            "ffn_gate.weight": (ff, hidden), "ffn_up.weight": (ff, hidden), "ffn_down.weight": (hidden, ff),
        }.items()})
    for name, shape in shapes.items():
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def reference_folder(tiny_gguf, tmp_path_factory):
    """A real conversion of the tiny GGUF, for converters that copy it."""
    out = tmp_path_factory.mktemp("reference")
    convert_gguf(tiny_gguf, out)
    return out


class Counting:
    """A converter that counts its calls; by default it copies the reference conversion."""

    def __init__(self, source=None, wait: threading.Barrier | None = None):
        self.source, self.wait, self.calls = source, wait, 0
        self.lock = threading.Lock()

    def __call__(self, gguf_path, out):
        with self.lock:
            self.calls += 1
        shutil.copytree(self.source, out, dirs_exist_ok=True)
        if self.wait:
            self.wait.wait(timeout=30)


def direct_gguf_load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_first_load_converts_and_the_second_reads_the_folder(tiny_gguf, reference_folder, tmp_path):
    convert = Counting(reference_folder)
    first = converted_folder(tiny_gguf, tmp_path, convert)
    second = converted_folder(tiny_gguf, tmp_path, convert)
    assert (first.converted, second.converted, convert.calls) == (True, False, 1)
    assert first.folder == second.folder == tmp_path / f"gguf-{sha256_file(tiny_gguf)[:16]}"
    marker = json.loads((first.folder / MARKER).read_text())
    assert marker["source_sha256"] == first.source_sha256 == sha256_file(tiny_gguf)
    assert set(marker["files"]) == {"model.safetensors"}
    assert marker["files"]["model.safetensors"]["sha256"] == sha256_file(first.folder / "model.safetensors")
    assert {"config.json", "tokenizer.json"} <= {p.name for p in first.folder.iterdir()}
    assert leftovers(tmp_path) == []


def test_the_key_is_the_content_not_the_path(tiny_gguf, reference_folder, tmp_path):
    convert = Counting(reference_folder)
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    shutil.copyfile(tiny_gguf, copy)
    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    a = converted_folder(tiny_gguf, tmp_path / "cache", convert)
    b = converted_folder(copy, tmp_path / "cache", convert)
    c = converted_folder(other, tmp_path / "cache", convert)
    assert a.folder == b.folder != c.folder and convert.calls == 2


def _truncate_weights(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_weight_byte(folder):
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_marker(**changes):
    def edit(folder):
        marker = json.loads((folder / MARKER).read_text())
        (folder / MARKER).write_text(json.dumps({**marker, **changes}))
    return edit


@pytest.mark.parametrize("damage", [
    pytest.param(lambda f: (f / MARKER).unlink(), id="marker-deleted"),
    pytest.param(lambda f: (f / MARKER).write_text("{not json"), id="marker-garbage"),
    pytest.param(lambda f: (f / "model.safetensors").unlink(), id="weights-deleted"),
    pytest.param(_truncate_weights, id="weights-truncated"),
    pytest.param(lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 4), id="weights-shorter-than-header"),
    pytest.param(_flip_a_weight_byte, id="weights-changed-same-size"),
    pytest.param(_edit_marker(source_sha256="0" * 64), id="other-source-hash"),
    pytest.param(_edit_marker(transformers_version="0.0.1"), id="other-transformers"),
    pytest.param(lambda f: (f / "config.json").unlink(), id="config-deleted"),
])
def test_a_damaged_conversion_is_detected_and_redone(damage, tiny_gguf, reference_folder, tmp_path):
    convert = Counting(reference_folder)
    folder = converted_folder(tiny_gguf, tmp_path, convert).folder
    damage(folder)
    assert gguf_cache.conversion_problem(folder, sha256_file(tiny_gguf), tmp_path / HASH_MEMO) is not None
    again = converted_folder(tiny_gguf, tmp_path, convert)
    assert again.converted and convert.calls == 2
    assert gguf_cache.conversion_problem(again.folder, again.source_sha256) is None
    assert leftovers(tmp_path) == []


def test_a_failed_conversion_leaves_no_folder(tiny_gguf, tmp_path):
    def broken(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        converted_folder(tiny_gguf, tmp_path, broken)
    with pytest.raises(ConversionError, match="no safetensors"):
        converted_folder(tiny_gguf, tmp_path, lambda g, out: (out / "config.json").write_text("{}"))
    assert [p.name for p in tmp_path.iterdir()] == [HASH_MEMO]


def test_concurrent_first_loads_agree_on_one_whole_folder(tiny_gguf, reference_folder, tmp_path):
    writers = 4
    convert = Counting(reference_folder, wait=threading.Barrier(writers))  # all convert before any renames
    results, errors = [], []

    def load():
        try:
            result = converted_folder(tiny_gguf, tmp_path, convert)
            results.append((result, os.stat(result.folder).st_ino))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and len(results) == writers and convert.calls == writers
    assert len({(r.folder, inode) for r, inode in results}) == 1  # the first folder renamed in stays
    first = results[0][0]
    assert gguf_cache.conversion_problem(first.folder, first.source_sha256) is None
    assert leftovers(tmp_path) == []


def test_a_whole_folder_that_appeared_meanwhile_is_kept(tiny_gguf, reference_folder, tmp_path):
    installed = converted_folder(tiny_gguf, tmp_path, Counting(reference_folder))
    inode = os.stat(installed.folder).st_ino
    late = tmp_path / "late"
    shutil.copytree(installed.folder, late)
    assert gguf_cache.install_conversion(late, installed.folder, installed.source_sha256) is False
    assert os.stat(installed.folder).st_ino == inode and late.is_dir()
    (installed.folder / MARKER).unlink()  # a damaged folder is replaced instead
    assert gguf_cache.install_conversion(late, installed.folder, installed.source_sha256) is True
    assert not late.exists() and gguf_cache.conversion_problem(installed.folder, installed.source_sha256) is None


def test_temporaries_of_killed_converters_are_removed(tiny_gguf, reference_folder, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / f"gguf-{sha256_file(tiny_gguf)[:16]}"
    abandoned = tmp_path / f".{target.name}.tmp-{gguf_cache.host_tag()}-{dead.pid}-0000"
    running = tmp_path / f".{target.name}.tmp-{gguf_cache.host_tag()}-{os.getpid()}-1111"
    abandoned.mkdir()
    running.mkdir()
    converted_folder(tiny_gguf, tmp_path, Counting(reference_folder))
    assert not abandoned.exists() and running.exists()


def test_the_hash_is_memoised_until_the_file_changes(tmp_path, monkeypatch):
    calls = []
    real = gguf_cache.sha256_file
    monkeypatch.setattr(gguf_cache, "sha256_file", lambda p: calls.append(p) or real(p))
    path, memo = tmp_path / "model.gguf", tmp_path / HASH_MEMO
    path.write_bytes(b"one")
    first = memoised_sha256(path, memo)
    assert memoised_sha256(path, memo) == first and len(calls) == 1
    path.write_bytes(b"two, longer")
    assert memoised_sha256(path, memo) == real(path) != first and len(calls) == 2
    memo.write_text("[broken")
    assert memoised_sha256(path, memo) == real(path) and len(calls) == 3


def test_the_reload_check_fails_on_other_weights(tiny_gguf, reference_folder):
    model, tokenizer = direct_gguf_load(tiny_gguf)
    check_reload_identical(model, tokenizer, reference_folder)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(ConversionError, match="weights"):
        check_reload_identical(model, tokenizer, reference_folder)


def test_load_model_converts_once_and_matches_the_direct_gguf_load(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    calls = []
    monkeypatch.setattr(gguf_cache, "convert_gguf", lambda g, out, **kw: calls.append(g) or convert_gguf(g, out, **kw))
    converted = load_model(str(tiny_gguf), device="cpu")
    again = load_model(str(tiny_gguf), device="cpu")
    assert len(calls) == 1 and converted.source == again.source == str(tiny_gguf)
    assert str(tmp_path) in converted.model.config._name_or_path
    direct, tokenizer = direct_gguf_load(tiny_gguf)
    assert converted.fingerprint == again.fingerprint == model_fingerprint(direct)
    assert converted.tokenizer(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    ours, theirs = converted.model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(converted.model(ids).logits, direct(ids).logits)


@pytest.mark.slow
def test_demo_converted_load_is_the_gguf_model():
    """The real demo: the cached conversion (made here if absent) gives the direct load's fingerprint and logits."""
    from lems_core.model import demo_gguf_path

    converted = load_model("demo", device="cpu")
    direct, tokenizer = direct_gguf_load(demo_gguf_path())
    assert converted.source == "demo"
    assert converted.fingerprint == model_fingerprint(direct)
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    assert converted.tokenizer.decode(ids[0]) == tokenizer.decode(ids[0])
    with torch.no_grad():
        assert torch.equal(converted.model(ids).logits, direct(ids).logits)
    ours, theirs = converted.model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_conversion_parses_the_file_once_and_restores_gguf(tiny_gguf, tmp_path, monkeypatch):
    """Config, tokenizer and weights share one gguf.GGUFReader (the direct-load equality is tested above)."""
    import gguf

    parsed = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, mode="r"):
            parsed.append(path)
            super().__init__(path, mode)
    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    name_map = gguf.get_tensor_name_map
    convert_gguf(tiny_gguf, tmp_path)
    assert len(parsed) == 1
    assert gguf.GGUFReader is CountingReader and gguf.get_tensor_name_map is name_map
    CountingReader(tiny_gguf)
    assert len(parsed) == 2  # outside a conversion every reader parses again


def test_an_offloaded_load_of_a_gguf_reads_its_conversion(tiny_gguf, tmp_path, monkeypatch):
    """accelerate maps safetensors, so the offloaded loader takes a GGUF through the same cached
    conversion as the whole-model loader, with the same weights (fingerprint) and no second conversion."""
    from lems_core.offload import load_offloaded

    monkeypatch.setenv("LEMS_GGUF_CACHE_DIR", str(tmp_path / "models"))
    whole = load_model(str(tiny_gguf), device="cpu")
    (conversion,) = [p for p in (tmp_path / "models").iterdir() if p.name.startswith("gguf-")]
    stamp = (conversion / "model.safetensors").stat().st_mtime_ns
    offloaded = load_offloaded(str(tiny_gguf), max_memory={"cpu": "1GB"}, offload_folder=tmp_path / "offload")
    assert offloaded.fingerprint == whole.fingerprint
    assert (conversion / "model.safetensors").stat().st_mtime_ns == stamp
    assert offloaded.tokenizer is not None
