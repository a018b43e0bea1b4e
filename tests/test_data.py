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


# ----------------------------------------------------------------- reference calibration and evaluation text
def test_reference_offsets_reach_the_end_of_the_text_and_legacy_ones_do_not():
    """randint(0, len - L - 1) (the reference) vs randint(0, len - 10L - 1) (profiles built before)."""
    from lems_core.calibration import CalibrationConfig

    text = "".join(chr(97 + (i * 7) % 26) for i in range(3_000))
    L = 32
    import random

    rng = random.Random(5)
    expected = []
    while len(expected) < 40:
        start = rng.randint(0, len(text) - L - 1)
        if len(text) - start >= L:  # the char tokenizer: a window is short only at the very end
            expected.append(torch.tensor([ord(c) % 256 for c in text[start:start + L]]))
    got = sample_windows(CharTokenizer(), text, 40, L, seed=5)
    assert torch.equal(got, torch.stack(expected))
    # legacy windows never start in the last 10L characters; reference ones do
    rng = random.Random(0)
    unique = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3_000))

    def starts(sampling):
        windows = sample_windows(CharTokenizer(), unique, 300, L, seed=5, sampling=sampling)
        return [unique.find("".join(chr(int(c)) for c in w)) for w in windows]
    assert max(starts("chars10")) <= len(unique) - 10 * L - 1 < max(starts("reference"))
    assert CalibrationConfig().sampling == "reference"
    with pytest.raises(ValueError, match="sampling"):
        sample_windows(CharTokenizer(), text, 1, L, seed=0, sampling="nope")


def test_calibration_configs_written_before_the_sampling_field_keep_their_rule_and_key():
    from lems_core.calibration import CalibrationConfig

    old = {"dataset": "wikitext2", "split": "validation", "n_samples": 16, "seq_len": 512, "seed": 42, "n_search": 8}
    cfg = CalibrationConfig.from_dict(old)
    assert cfg.sampling == "chars10" and cfg.to_dict() == old  # byte-identical: same cache keys
    new = CalibrationConfig(n_samples=16, seq_len=512, n_search=8)
    assert new.to_dict()["sampling"] == "reference"
    assert CalibrationConfig.from_dict(new.to_dict()) == new
    with pytest.raises(ValueError, match="sampling"):
        CalibrationConfig(sampling="bogus")


def test_presets_match_the_reference_sizes_and_use_train_when_present(tmp_path, monkeypatch):
    from lems_core.calibration import default_preset, preset

    monkeypatch.setenv("LEMS_DATA_DIR", str(tmp_path))
    ref = preset("reference")
    assert (ref.n_samples, ref.seq_len, ref.n_search, ref.seed, ref.sampling) == (256, 2048, 32, 42, "reference")
    assert ref.split == "validation"  # no train copy here
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.train.raw").write_text(" x \n")
    assert preset("reference").split == "train" and preset("cpu", split="test").split == "test"
    assert default_preset("cuda") == "reference" and default_preset("cuda:1") == "reference"
    assert default_preset("cpu") == "cpu"


def test_wikitext_detokeniser_undoes_the_markers_and_keeps_unk():
    from lems_core.data import wikitext_detokenize

    src = ' = = Career = = \n The game \'s guest @-@ starring role , 1 @,@ 000 ( 3 @.@ 5 ) " Craig " <unk> . \n'
    out = wikitext_detokenize(src)
    assert out == ' == Career ==\nThe game\'s guest-starring role, 1,000 (3.5) "Craig" <unk>.\n'
    assert wikitext_detokenize("plain text") == "plain text"


def test_detok_dataset_reads_the_tokens_file_through_the_detokeniser(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "valid.tokens.txt").write_text(" a @-@ b , c \n")
    monkeypatch.setenv("LEMS_DATA_DIR", str(tmp_path))
    plain, _ = load_text("wikitext2", "validation")
    detok, src = load_text("wikitext2-detok", "validation")
    assert plain == " a @-@ b , c \n" and detok == " a-b, c\n"
    assert src.name == "wikitext2-detok" and src.origin.endswith("valid.tokens.txt")


def test_ptb_is_evaluated_on_test_when_a_copy_exists_else_on_validation_with_a_warning(tmp_path, monkeypatch):
    from lems_core.data import EvalSplitWarning, evaluation_split

    monkeypatch.setenv("LEMS_DATA_DIR", str(tmp_path))
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.valid.txt").write_text("v\n")
    with pytest.warns(EvalSplitWarning, match="validation"):
        assert evaluation_split("ptb") == "validation"
    assert evaluation_split("ptb", allow_download=True) == "test"  # the hub has the test split
    (tmp_path / "ptb" / "ptb.test.txt").write_text("t\n")
    assert evaluation_split("ptb") == "test"
    assert load_text("ptb", evaluation_split("ptb"))[0] == "t"
    assert evaluation_split("wikitext2") == "test" and evaluation_split("c4") == "validation"
