#!/usr/bin/env python
"""Train the sentencepiece tokenizer (pad 0, unk 1, bos 2, eos 3) from shard captions or a text file."""
import os

import _bootstrap  # noqa: F401
from megatron_ov3.cli import Parser, exit_with
from megatron_ov3.data.shards import RECAPTION_KEY
from megatron_ov3.errors import MissingFile, UsageError


def _captions_from_shards(spec, limit, recaption_key):
    """Every caption of the shards: the alt-text and, in two-caption data, the recaption."""
    from megatron_ov3.data.shards import caption_of, expand_urls, iter_tar_samples, recaption_of

    n = 0
    for source in expand_urls(spec):
        for url in source:
            if not os.path.isfile(url):
                raise MissingFile(f"shard {url!r} does not exist")
            for smp in iter_tar_samples(url, lambda *a: None):
                for cap in (caption_of(smp), recaption_of(smp, recaption_key)):
                    if cap:
                        yield cap
                        n += 1
                        if limit and n >= limit:
                            return


def _text_file_lines(path: str) -> list:
    """The lines of a UTF-8 text file; anything else (a binary file, another encoding) is a usage error."""
    if not os.path.isfile(path):
        raise MissingFile(f"--text-file {path!r} does not exist")
    data = open(path, "rb").read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--text-file {path!r} is not UTF-8 text (byte {e.start}); give one sentence per line")
    if "\x00" in text:
        raise UsageError(f"--text-file {path!r} holds NUL bytes (a binary file?); give one sentence per line")
    return text.splitlines()


def main(argv=None):
    p = Parser(description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-path", help="shards whose captions to train on (brace notation, '::' joins)")
    src.add_argument("--text-file", help="a text file, one sentence per line")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model (and PREFIX.vocab); an existing "
                   "model is never replaced unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.model (checkpoints trained "
                   "with the old one will no longer match its vocabulary)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--max-sentences", type=int, default=2_000_000)
    p.add_argument("--recaption-key", default=RECAPTION_KEY, help="field of KEY.json holding a second caption, "
                   "trained on too (default %(default)s, Recap-DataComp's)")
    args = p.parse_args(argv)
    from megatron_ov3.data.tokenizer import Tokenizer, train_tokenizer

    if os.path.exists(args.output_prefix + ".model") and not args.overwrite:
        raise UsageError(f"{args.output_prefix}.model exists; give another --output-prefix (or --overwrite, if no "
                         f"checkpoint uses it)")
    if args.text_file:
        texts = _text_file_lines(args.text_file)
    else:
        texts = list(_captions_from_shards(args.data_path, args.max_sentences, args.recaption_key))
    if not texts:
        raise UsageError("no captions found to train on")
    path = train_tokenizer(texts, args.output_prefix, args.vocab_size, args.model_type)
    print(f"wrote {path} (vocab {Tokenizer(path).vocab_size}, trained on {len(texts)} sentences)")


if __name__ == "__main__":
    exit_with(main)
