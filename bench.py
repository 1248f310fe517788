"""
Benchmarks, one file each under benchmarks/, run on the CPU unless a GPU is there. Each prints a table or a line
for the README or docs/; none of them is a test.

    python bench.py layer   # one adapted layer: time and saved memory, full fine-tuning vs LoRaD three ways
    python bench.py step    # one WaDi step: wadi.py's design vs the authors' (three UNets, hooks, 4 CFG calls)
                            #   on a GPU: --sizes sd15 --student_rank 256 --fake_rank 32 -- --gradient_checkpointing
    python bench.py plan    # GPU memory and time per step, counted from wadi's train_step on fake tensors
    python bench.py ops     # ops (GPU kernel launches) one step dispatches at SD1.5 size, by source, ours vs the authors
    python bench.py sd15    # one step of the real SD1.5 architecture on CPU, and the paper's recipe counted by plan
    python bench.py toy     # distill a toy teacher with wadi.py and score it against its known modes
    python bench.py digits  # distill a teacher of real handwritten digits with wadi.py, scored as the paper's Table 1

`python bench.py NAME --help` lists a benchmark's flags; flags after `--` go to wadi.py where a benchmark runs it.
"""
import importlib
import sys

NAMES = ("layer", "step", "plan", "ops", "sd15", "toy", "digits")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(print(__doc__))
    if sys.argv[1] not in NAMES:
        sys.exit(f"bench.py: unknown benchmark {sys.argv[1]!r}; one of: {', '.join(NAMES)}")
    import diffusers
    import transformers
    for lib in (diffusers, transformers):  # their loading bars and notices would drown the tables
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    importlib.import_module(f"benchmarks.{sys.argv[1]}").main(sys.argv[2:])
