"""A toy model for the inference tests: the contract of the platform in the seed
(``load_model(self)``, ``execute(self, data, batch_size) -> list``), standard library only.

Each request body is text. ``execute`` answers, per item, a JSON object with the text
upper-cased, the batch size it was called with and this model's version (from
``VERSION`` in the model folder). A body ``fail`` makes the whole batch raise (the runtime
then isolates it); ``sleep:S`` sleeps S seconds; ``bytes`` returns raw bytes."""
import json
import os
import pathlib
import time


class Model:
    def load_model(self):
        delay = float(os.environ.get("TOY_LOAD_DELAY", "0"))
        time.sleep(delay)
        path = pathlib.Path("VERSION")
        self.version = path.read_text().strip() if path.exists() else "?"
        if self.version == "broken":
            raise RuntimeError("this model version is broken on purpose")
        self.calls = 0

    def execute(self, data, batch_size):
        self.calls += 1
        texts = [f.read().decode("utf-8", "replace") for f in data]
        if any(t == "fail" for t in texts):
            raise ValueError("asked to fail")
        naps = [float(t[6:]) for t in texts if t.startswith("sleep:")]
        if naps:
            time.sleep(max(naps))
        out = []
        for t in texts:
            if t == "bytes":
                out.append(b"\x00\x01raw")
            else:
                out.append({"upper": t.upper(), "batch_size": batch_size, "version": self.version, "pid": os.getpid()})
        return out


class FixedCost:
    """A model whose cost per call is mostly fixed (like a GPU kernel launch and transfer):
    COST_MS per call plus PER_ITEM_MS per item. Used by the batching benchmark."""

    def load_model(self):
        self.cost = float(os.environ.get("COST_MS", "20")) / 1000
        self.per_item = float(os.environ.get("PER_ITEM_MS", "0.2")) / 1000

    def execute(self, data, batch_size):
        time.sleep(self.cost + self.per_item * batch_size)
        return [json.dumps({"n": len(f.read())}) for f in data]
