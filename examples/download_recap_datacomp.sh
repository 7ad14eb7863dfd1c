#!/usr/bin/env bash
# Recap-DataComp-1B (the OV3 paper's data) -> webdataset shards that keep BOTH captions, with img2dataset (PyPI:
# `pip install img2dataset`, or this package's `[data]` extra). Rows of the dataset's parquet files
# (huggingface.co/datasets/UCSC-VLAA/Recap-DataComp-1B) carry the image URL, the original alt-text and the
# LLaVA-Llama-3 recaption; every shard sample becomes
#   KEY.jpg   the image (shorter side at most IMAGE_SIZE, JPEG quality 95)
#   KEY.txt   the alt-text (CAPTION_COL)                 -> the contrastive text tower (--contrastive-texts)
#   KEY.json  img2dataset's metadata + the recaption (RECAPTION_COL, read with --recaption-key) -> caption decoder
# plus img2dataset's NAME_stats.json per shard (the loader reads the sample count from it, so a truncated shard
# counts the samples it lost). Then: tools/train_tokenizer.py --data-path OUTPUT/{00000..NNNNN}.tar (it reads
# both captions) and train with DATA_PATH=OUTPUT/{00000..NNNNN}.tar.
#
#   URL_LIST=/data/recap-datacomp-parquet OUTPUT=/data/recap-datacomp bash examples/download_recap_datacomp.sh
#
# Extra arguments go to img2dataset as they are (e.g. --distributor pyspark for a cluster).
set -euo pipefail
: "${URL_LIST:?set URL_LIST to a Recap-DataComp-1B parquet file or a folder of them}"
: "${OUTPUT:?set OUTPUT to the folder for the shards}"
NO_ALBUMENTATIONS_UPDATE=1 exec img2dataset --url_list "$URL_LIST" --input_format parquet \
  --url_col "${URL_COL:-url}" --caption_col "${CAPTION_COL:-org_caption}" \
  --save_additional_columns "[\"${RECAPTION_COL:-re_caption}\"]" \
  --output_format webdataset --output_folder "$OUTPUT" \
  --image_size "${IMAGE_SIZE:-512}" --resize_mode keep_ratio --resize_only_if_bigger True --encode_quality 95 \
  --number_sample_per_shard "${SAMPLES_PER_SHARD:-10000}" \
  --processes_count "${PROCESSES:-16}" --thread_count "${THREADS:-64}" \
  --timeout "${TIMEOUT:-10}" --retries "${RETRIES:-1}" --enable_wandb False "$@"
