"""Peers: recommendation models from real libraries, trained and scored on kuberank's own split.

RecBole 1.2.1's SASRec and GRU4Rec (sequential), LightGCN, BPR and ItemKNN (general) are
trained by RecBole's own code; kuberank only writes their input and reads their scores:

- input: RecBole atomic files written from the prepared dataset's ``split`` column (the one
  source) through RecBole's pre-split mechanism (``benchmark_filename``): ``train`` rows are
  the training file and ``validation`` rows the validation file, so RecBole trains on exactly
  kuberank's train rows and stops early on kuberank's validation rows (``stopping_step``
  evaluations without improvement of NDCG@10; the best epoch's weights are kept). RecBole
  never reads a ``test`` row: its test file repeats the validation rows (RecBole requires three
  files) and is never used. Sequential models get RecBole's pre-augmented form (each train
  prefix predicts its next item; the validation item is predicted from the whole train
  sequence).
- output: the model's own ``full_sort_predict`` for the evaluated users (sequential models
  read the user's history of the evaluation task: for ``test`` it ends at the validation
  item), mapped onto kuberank's catalogue; :func:`kuberank.components.evaluate.rank` then ranks
  the full catalogue with seen items excluded and :mod:`kuberank.metrics` scores it, as for
  every other model. Items RecBole never saw (no train or validation row) rank last.

Training can be resumed (``checkpoint_dir``): after every epoch's validation the trainer's
whole state (weights, optimizer, early-stopping counter, the best epoch's weights, and the
random states of Python, NumPy, torch and RecBole's training loader) is written atomically to
``checkpoint_dir/resume.pt``; a later run with the same model, configuration and data
continues after that epoch and ends as the uninterrupted run would (same batches, same
dropout). An hour-long SASRec run on a CPU thus survives being stopped.

EASE^R is kuberank's closed form (:class:`kuberank.components.evaluate.EASERanker`).
RecBole is installed with ``pip install --no-deps recbole==1.2.1`` (its metadata pins an old
Ray) plus the ``peers`` extra (its runtime dependencies): ``pip install 'kuberank[peers]'``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import random
import sys
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from kuberank import datasets
from kuberank.components.evaluate import PEERS, EASERanker, Ranker
from kuberank.errors import KuberankError

# kuberank's name -> RecBole's class; the names are evaluate.PEERS (load_ranker's list).
RECBOLE_MODELS = dict(zip(PEERS, ("SASRec", "GRU4Rec", "LightGCN", "BPR", "ItemKNN")))
SEQUENTIAL = ("sasrec", "gru4rec")
INSTALL = "pip install 'kuberank[peers]' && pip install --no-deps recbole==1.2.1"
MAX_EPOCHS = 300  # RecBole's default; early stopping ends training long before on ML-100K
STOPPING_STEP = 10  # RecBole's default patience (validation evaluations without improvement)
MAX_HISTORY = 50  # RecBole's MAX_ITEM_LIST_LENGTH default
RESUME_FILE = "resume.pt"
log = logging.getLogger(__name__)


def require_recbole(name: str) -> None:
    """Import RecBole's parts or fail with a message naming the extra to install."""
    try:  # recbole and torch: heavy and optional (the peers extra); loaded only for a peer
        import colorlog  # noqa: F401
        import recbole.config  # noqa: F401
        import texttable  # noqa: F401
    except ImportError as exc:
        raise KuberankError(
            f"--model {name}: a peer from RecBole, which is not installed ({exc.name} is "
            f"missing); install it with: {INSTALL}"
        ) from None


def atomic_files(
    data: datasets.Dataset, root: Path, name: str, sequential: bool, max_history: int = MAX_HISTORY
) -> Path:
    """Write ``root/name/name.{train,valid,test}.inter`` from the dataset's split. Returns the
    dataset directory. The test file repeats the validation rows (RecBole never sees test)."""
    inter = data.interactions
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    train = inter[inter["split"] == "train"]
    valid = inter[inter["split"] == "validation"]
    if sequential:
        train_frame, valid_frame = _sequences(train, valid, max_history)
        header = "user_id:token\titem_id_list:token_seq\titem_id:token"
    else:
        train_frame, valid_frame = (f[["user_id", "item_id"]] for f in (train, valid))
        header = "user_id:token\titem_id:token"
    for part, frame in (("train", train_frame), ("valid", valid_frame), ("test", valid_frame)):
        lines = ["\t".join(map(str, row)) for row in frame.itertuples(index=False)]
        (folder / f"{name}.{part}.inter").write_text("\n".join([header, *lines]) + "\n")
    return folder


def _sequences(
    train: pd.DataFrame, valid: pd.DataFrame, max_history: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RecBole's augmented sequential rows: (user, previous items, next item). Train rows are
    in time order per user (the prepared dataset's order)."""
    train_rows, valid_rows = [], []
    valid_item = dict(zip(valid["user_id"], valid["item_id"]))
    for user, items in train.groupby("user_id", sort=False)["item_id"]:
        seq = items.tolist()
        for i in range(1, len(seq)):
            train_rows.append((user, " ".join(seq[max(0, i - max_history) : i]), seq[i]))
        if user in valid_item:
            valid_rows.append((user, " ".join(seq[-max_history:]), valid_item[user]))
    columns = ["user_id", "item_id_list", "item_id"]
    return pd.DataFrame(train_rows, columns=columns), pd.DataFrame(valid_rows, columns=columns)


@contextlib.contextmanager
def _recbole_compat():
    """RecBole 1.2.1 predates pandas 3 and scipy 1.17; two of its calls changed meaning:

    - ``Series.agg(len)`` (measuring token sequences) was per element before pandas 3 and is
      the whole Series' length since: while RecBole runs, that one call is per element again;
    - ``dok_matrix._update(dict)`` (LightGCN's adjacency matrix) is gone from scipy: it is
      the dict update of the matrix's entries it always was.

    Every other call is untouched, and both are restored afterwards."""
    original_agg = pd.Series.agg

    def agg(self, func=None, *args, **kwargs):
        if func is len and not args and not kwargs:
            return self.map(len)
        return original_agg(self, func, *args, **kwargs)

    had_update = hasattr(sparse.dok_matrix, "_update")
    pd.Series.agg = agg
    if not had_update:
        sparse.dok_matrix._update = lambda self, entries: self._dict.update(entries)
    try:
        yield
    finally:
        pd.Series.agg = original_agg
        if not had_update:
            del sparse.dok_matrix._update


class RecBoleRanker(Ranker):
    """A RecBole model trained on the task's dataset (train rows, early stopping on validation
    rows) and asked for full-catalogue scores. ``training`` records epochs and time."""

    def __init__(
        self,
        name: str,
        max_epochs: int = MAX_EPOCHS,
        seed: int = 0,
        stopping_step: int = STOPPING_STEP,
        checkpoint_dir: str | Path | None = None,
        **params,
    ):
        if name not in RECBOLE_MODELS:
            raise KuberankError(f"--model: {name!r} is not one of {', '.join(RECBOLE_MODELS)}")
        require_recbole(name)
        if int(max_epochs) < 1:
            raise KuberankError(f"--max-epochs: need at least 1 epoch, not {max_epochs}")
        if params.get("eval_step", 1) != 1:
            # the saved state, epochs_run and early stopping count validated epochs
            raise KuberankError(
                f"eval_step: the peers validate after every epoch; got {params['eval_step']}"
            )
        self.name = name
        self.max_epochs, self.seed, self.stopping_step = int(max_epochs), int(seed), stopping_step
        self.params = params
        self.sequential = name in SEQUENTIAL
        # absolute: RecBole runs in a working directory of its own
        self.checkpoint_dir = Path(checkpoint_dir).resolve() if checkpoint_dir else None
        self.training: dict = {}

    def config_dict(self, data_root: Path) -> dict:
        """RecBole's configuration: its model defaults, kuberank's split, CPU unless a GPU is
        there, NDCG@10 on validation for early stopping."""
        import torch

        config = {
            "data_path": str(data_root),
            "checkpoint_dir": str(data_root / "saved"),
            "benchmark_filename": ["train", "valid", "test"],
            "seed": self.seed,
            "reproducibility": True,
            "use_gpu": torch.cuda.is_available(),
            "show_progress": False,
            "state": "WARNING",
            "epochs": self.max_epochs,
            "stopping_step": self.stopping_step,
            "eval_step": 1,
            "metrics": ["NDCG", "Recall"],
            "topk": [10],
            "valid_metric": "NDCG@10",
            "eval_args": {"mode": "full", "order": "TO", "group_by": "user"},
            "USER_ID_FIELD": "user_id",
            "ITEM_ID_FIELD": "item_id",
            "user_inter_num_interval": "[0,inf)",
            "item_inter_num_interval": "[0,inf)",
        }
        if self.sequential:
            config.update(
                load_col={"inter": ["user_id", "item_id_list", "item_id"]},
                alias_of_item_id=["item_id_list"],
                MAX_ITEM_LIST_LENGTH=MAX_HISTORY,
                train_neg_sample_args=None,  # SASRec/GRU4Rec default: cross-entropy over items
            )
        else:
            config.update(load_col={"inter": ["user_id", "item_id"]})
        config.update(self.params)
        return config

    def prepare(self, task):
        if task.dataset.kind != datasets.RECOMMENDATION:
            raise KuberankError(
                f"--model {self.name}: a recommendation peer; this dataset is a search collection"
            )
        from recbole.config import Config
        from recbole.data import create_dataset, data_preparation
        from recbole.utils import get_model, get_trainer, init_seed

        started = time.perf_counter()
        self._workdir = tempfile.TemporaryDirectory(prefix=f"kuberank-{self.name}-")
        root = Path(self._workdir.name)
        atomic_files(task.dataset, root, "kuberank", self.sequential)
        model_name = RECBOLE_MODELS[self.name]
        argv, sys.argv = sys.argv, sys.argv[:1]  # RecBole's Config also parses the command line
        try:
            config = Config(
                model=model_name, dataset="kuberank", config_dict=self.config_dict(root)
            )
        finally:
            sys.argv = argv
        init_seed(config["seed"], config["reproducibility"])
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        # RecBole's Trainer writes TensorBoard logs under the working directory.
        with contextlib.chdir(root), warnings.catch_warnings(), _recbole_compat():
            # RecBole 1.2.1 on pandas 3 / torch 2.13: deprecation notices, not errors.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", pd.errors.ChainedAssignmentError)
            try:
                dataset = create_dataset(config)
                train_data, valid_data, _ = data_preparation(config, dataset)
                init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
                model = get_model(model_name)(config, train_data._dataset).to(config["device"])
                trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
                state = _Progress(
                    self._fingerprint(root), self.checkpoint_dir, f"{self.name} seed {self.seed}"
                )
                state.restore(trainer, train_data)
                if not state.done:
                    before = state.seconds  # trained in earlier sittings

                    def after_epoch(epoch: int, score: float) -> None:
                        state.seconds = before + time.perf_counter() - started
                        state.record(trainer, train_data, epoch, score)

                    trainer.fit(
                        train_data, valid_data, verbose=False, saved=False, callback_fn=after_epoch
                    )
                    state.finish()
                model.load_state_dict(state.best["state_dict"])
                model.load_other_parameter(state.best["other_parameter"])
            finally:
                quiet.setLevel(level)
        model.eval()
        for cached in ("restore_user_e", "restore_item_e"):  # LightGCN's cache of the last epoch
            if hasattr(model, cached):
                setattr(model, cached, None)
        self.model, self.config, self.dataset = model, config, dataset
        epochs = state.epochs
        self.training = {
            "library": "recbole 1.2.1",
            "recbole_model": model_name,
            "epochs_run": len(epochs),
            "best_epoch": state.best["epoch"] + 1,
            "max_epochs": trainer.epochs,
            "stopped_early": len(epochs) < trainer.epochs,
            "valid_ndcg@10": round(float(state.best["score"]), 6),
            "seed": self.seed,
            "train_seconds": round(state.seconds, 2),
            "resumed_after_epochs": [e + 1 for e in state.resumed],
        }

        # kuberank item index -> RecBole internal id (0: never seen by RecBole).
        token_id = dataset.field2token_id["item_id"]
        self.internal = np.array([token_id.get(i, 0) for i in task.dataset.item_ids], np.int64)
        users = dataset.field2token_id["user_id"]
        self.user_ids = np.array([users.get(u, 0) if u else 0 for u in task.users], np.int64)

    def _fingerprint(self, root: Path) -> str:
        """What a saved training state must match to be resumed: the model, its configuration
        (paths aside), the data RecBole reads, and the library versions."""
        config = {
            k: v
            for k, v in self.config_dict(root).items()
            if k not in ("data_path", "checkpoint_dir")
        }
        digest = hashlib.sha256(
            json.dumps(
                {
                    "model": self.name,
                    "config": config,
                    "recbole": version("recbole"),
                    "torch": version("torch"),
                },
                sort_keys=True,
                default=str,
            ).encode()
        )
        for part in sorted((root / "kuberank").glob("*.inter")):
            digest.update(part.name.encode() + part.read_bytes())
        return digest.hexdigest()

    def scores(self, task, rows):
        import torch
        from recbole.data.interaction import Interaction

        device = self.config["device"]
        if self.sequential:
            width = MAX_HISTORY
            seqs = np.zeros((len(rows), width), dtype=np.int64)
            lengths = np.zeros(len(rows), dtype=np.int64)
            for i, r in enumerate(rows):
                history = self.internal[task.histories[r]]
                history = history[history > 0][-width:]
                seqs[i, : len(history)] = history
                lengths[i] = max(len(history), 1)  # an empty history reads the padding item
            batch = {
                self.model.ITEM_SEQ: torch.from_numpy(seqs),
                self.model.ITEM_SEQ_LEN: torch.from_numpy(lengths),
            }
        else:
            batch = {self.model.USER_ID: torch.from_numpy(self.user_ids[rows])}
        with torch.no_grad():
            full = self.model.full_sort_predict(Interaction(batch).to(device))
        full = full.reshape(len(rows), -1).float().cpu().numpy()
        out = full[:, self.internal]
        unknown = self.internal == 0
        if unknown.any():
            out[:, unknown] = full[:, 1:].min(axis=1, keepdims=True) - 1.0
        return out


KEPT = ("fingerprint", "epochs", "best", "seconds", "resumed", "done")
LAST = (
    "epoch",
    "cur_step",
    "best_valid_score",
    "state_dict",
    "other_parameter",
    "optimizer",
    "rng",
)


class _Progress:
    """A RecBole training's progress: the validation score of every epoch, the best epoch's
    weights, seconds trained, and (with a checkpoint directory) the resumable state after the
    last epoch, written atomically after each one."""

    def __init__(self, fingerprint: str, directory: Path | None, label: str):
        self.fingerprint, self.directory = fingerprint, directory
        self.label = label  # the run, as the log names it ("sasrec seed 0")
        self.epochs: list[tuple[int, float]] = []
        self.best: dict = {}
        self._last: dict = {}  # the trainer's state after the last epoch
        self.seconds = 0.0
        self.resumed: list[int] = []
        self.done = False

    @property
    def path(self) -> Path | None:
        return self.directory / RESUME_FILE if self.directory is not None else None

    def restore(self, trainer, train_data) -> None:
        """Continue from the saved state when it matches; a state of another run is replaced.
        The file is a pickle (torch.save): resume only from a directory you trust."""
        import torch

        if self.path is None or not self.path.exists():
            return
        try:  # on the CPU: random states must stay there; weights are copied into place
            saved = torch.load(self.path, map_location="cpu", weights_only=False)
            complete = isinstance(saved, dict) and all(k in saved for k in (*LAST, *KEPT))
        except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, another format
            saved, complete = {}, False
            log.warning("%s: %s unreadable (%s)", self.label, self.path, exc)
        if not complete:
            log.warning(
                "%s: %s is not a saved training state; training from the start",
                self.label,
                self.path,
            )
            return
        if saved.get("fingerprint") != self.fingerprint:
            log.warning(
                "%s: %s holds another run's state (other model, settings or data); "
                "training from the start",
                self.label,
                self.path,
            )
            return
        self.epochs = [tuple(e) for e in saved["epochs"]]
        self.best, self.seconds = saved["best"], saved["seconds"]
        self.resumed, self._last = saved["resumed"], {k: saved[k] for k in LAST}
        # a run killed after its last epoch was saved but before it was marked finished is done
        # (a state is saved after each epoch's validation: eval_step is 1, see __init__)
        stopped = saved["cur_step"] > trainer.stopping_step or saved["epoch"] + 1 >= trainer.epochs
        self.done = saved["done"] or stopped
        if self.done:
            log.warning(
                "%s: training finished earlier (%s); its best epoch is used",
                self.label,
                self.path,
            )
            return
        self.resumed.append(saved["epoch"])
        trainer.start_epoch = saved["epoch"] + 1
        trainer.cur_step = saved["cur_step"]
        trainer.best_valid_score = saved["best_valid_score"]
        trainer.model.load_state_dict(saved["state_dict"])
        trainer.model.load_other_parameter(saved["other_parameter"])
        trainer.optimizer.load_state_dict(saved["optimizer"])
        rng = saved["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        train_data.generator.set_state(rng["loader"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        log.warning(
            "%s: resuming after epoch %d of %d (%s)",
            self.label,
            saved["epoch"] + 1,
            trainer.epochs,
            self.path,
        )

    def record(self, trainer, train_data, epoch: int, score: float) -> None:
        """After an epoch's validation (RecBole's callback): keep its score, the weights when
        it is the best so far (RecBole's early stopping reset its counter), and save."""
        import torch

        self.epochs.append((epoch, float(score)))
        if trainer.cur_step == 0:
            self.best = {
                "epoch": epoch,
                "score": float(score),
                "state_dict": copy.deepcopy(trainer.model.state_dict()),
                "other_parameter": copy.deepcopy(trainer.model.other_parameter()),
            }
        self._last = {
            "epoch": epoch,
            "cur_step": trainer.cur_step,
            "best_valid_score": trainer.best_valid_score,
            "state_dict": trainer.model.state_dict(),
            "other_parameter": trainer.model.other_parameter(),
            "optimizer": trainer.optimizer.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "loader": train_data.generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        self.save()

    def finish(self) -> None:
        self.done = True
        self.save()

    def save(self) -> None:
        import torch

        if self.path is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        state = {
            **self._last,
            "fingerprint": self.fingerprint,
            "epochs": self.epochs,
            "best": self.best,
            "seconds": self.seconds,
            "resumed": self.resumed,
            "done": self.done,
        }
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save(state, partial)
        partial.replace(self.path)


def load_peer(
    name: str, max_epochs: int = MAX_EPOCHS, seed: int = 0, checkpoint_dir: Path | None = None
) -> Ranker:
    """A peer by name: a RecBole model (resumable with ``checkpoint_dir``), or kuberank's
    EASE^R (closed form: no epochs, no seed, nothing to resume)."""
    if name == "ease":
        return EASERanker()
    return RecBoleRanker(name, max_epochs=max_epochs, seed=seed, checkpoint_dir=checkpoint_dir)


EVERY_PEER = (*PEERS, "ease")
