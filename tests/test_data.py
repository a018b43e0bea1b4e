import pytest
import torch

from lems_core.calibration import sample_windows
from lems_core.data import DataNotFoundError, join_rows, load_text, read_rows


class CharTokenizer:
    """One token per character: enough to test window sampling exactly."""

    def __call__(self, text, return_tensors=None):
        class Out:
            input_ids = torch.tensor([[ord(c) % 256 for c in text]])
        return Out()


def test_local_wikitext_rows_rebuild_the_hub_layout(tmp_path):
    f = tmp_path / "wiki.test.raw"
    f.write_text(" = Title = \n \n Body line .\n")
    assert read_rows(f) == [" = Title = \n", "", " Body line .\n"]
    text, src = load_text(str(f))
    assert text == " = Title = \n" + "\n\n" + "" + "\n\n" + " Body line .\n"
    assert src.origin == str(f)


def test_ptb_rows_are_stripped_sentences(tmp_path):
    f = tmp_path / "ptb.valid.txt"
    f.write_text(" a b c \n d e \n")
    assert read_rows(f) == ["a b c", "d e"]


def test_jsonl_c4_layout(tmp_path):
    f = tmp_path / "c4.jsonl"
    f.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_text(str(f))[0] == "one\n\ntwo"


def test_known_names_use_the_local_data_dir(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.valid.txt").write_text("x y\nz\n")
    monkeypatch.setenv("LEMS_DATA_DIR", str(tmp_path))
    text, src = load_text("ptb", "validation")
    assert text == join_rows(["x y", "z"]) and src.origin.endswith("ptb.valid.txt")
    with pytest.raises(DataNotFoundError, match="allow_download"):
        load_text("c4", "validation")
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_text("imagenet")


def test_calibration_windows_are_seeded_and_exact_length():
    text = "".join(chr(97 + (i * 7) % 26) for i in range(50_000))
    a = sample_windows(CharTokenizer(), text, 5, 64, seed=42)
    b = sample_windows(CharTokenizer(), text, 5, 64, seed=42)
    c = sample_windows(CharTokenizer(), text, 5, 64, seed=43)
    assert a.shape == (5, 64) and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="too short"):
        sample_windows(CharTokenizer(), "short", 1, 64, seed=0)
