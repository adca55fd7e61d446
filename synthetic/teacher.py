"""
The embedded default teacher (checkpoints/synth-teacher): a small Llama-style model trained from
scratch with plain next-token prediction on the synthetic problems, by distill.py --pretrain.
distill.py builds it with this recipe when the directory is missing.
"""
import os
import shutil

from model import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEACHER = os.path.join(ROOT, "checkpoints", "synth-teacher")

SYNTH_TEACHER = Config(model_type="llama", vocab_size=512, n_layer=4, n_head=6, n_kv_head=6,
                       d_model=192, head_dim=32, d_ff=512, max_seq_len=256, tie_embeddings=True)
# the command that built checkpoints/synth-teacher (distill.py runs it if it is missing); its
# settings are the paper recipe's defaults (fixed-length batches) and these
TEACHER_RECIPE = ["--recipe", "paper", "--pretrain", "--data", "synthetic", "--out", DEFAULT_TEACHER,
                  "--steps", "5000", "--lr", "2e-3", "--warmup", "100", "--cooldown", "2000",
                  "--seq-len", "256", "--step-tokens", "6144", "--micro-batch", "32",
                  "--save-every", "500", "--log-every", "50"]



def build_default_teacher(train, resuming):
    """Run TEACHER_RECIPE with `train(argv)` (distill.py's loop; passed in, so that this module
    never imports distill), continuing a killed build if `resuming`, then hoist the model out of
    the run directory: the teacher is the plain model, without the optimizer state."""
    print(f"no embedded teacher at {DEFAULT_TEACHER}: building it first "
          f"(python distill.py {' '.join(TEACHER_RECIPE)})", flush=True)
    train(TEACHER_RECIPE + (["--resume"] if resuming else ["--overwrite"]))   # its log and args
    ckpt = os.path.join(DEFAULT_TEACHER, "ckpt")
    for name in os.listdir(ckpt):
        if name != "train_state.pt":
            os.replace(os.path.join(ckpt, name), os.path.join(DEFAULT_TEACHER, name))
    shutil.rmtree(ckpt)
