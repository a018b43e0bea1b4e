"""``ppl``: perplexity of a dense model."""
from __future__ import annotations

from .common import add_model_options, progress_bar
from .types import positive_int, window_cap

NAME = "ppl"
HELP = "perplexity of a (dense) model"  # its line in `-h`


def add_parser(subparsers):
    """The ``ppl`` subparser, with all its options."""
    sp = subparsers.add_parser(NAME, help=HELP)
    add_model_options(sp)
    sp.add_argument("--datasets", default="wikitext2",
                    help="datasets (known names or text files), comma separated (default wikitext2)")
    sp.add_argument("--split", default=None, help="split to measure (default: each dataset's evaluation split)")
    sp.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per window (default 2048)")
    sp.add_argument("--max-windows", type=window_cap, default=None,
                    help="measure at most this many windows per dataset (a positive number, or 'all'; default all)")
    sp.add_argument("--download", action="store_true", help="allow fetching datasets from the hub")
    sp.set_defaults(fn=run)
    return sp


def run(args) -> int:
    """Print the perplexity of the model on each dataset."""
    from ..data import evaluation_split, load_text
    from ..evaluation import perplexity, token_windows
    from ..pipeline import get_model

    loaded = get_model(args.model, args.device)
    for ds in args.datasets.split(","):
        text, origin = load_text(ds, args.split or evaluation_split(ds, args.download), allow_download=args.download)
        windows = token_windows(loaded.tokenizer, text, args.seq_len,
                                None if args.max_windows == "all" else args.max_windows)  # None = all
        with progress_bar(f"ppl {ds}") as bar:
            result = perplexity(loaded.model, windows, progress=bar)
        print(f"{ds} {origin.split} ({origin.origin}): ppl {result.ppl:.3f} over {result.windows} windows "
              f"x {args.seq_len} tokens")
    return 0
