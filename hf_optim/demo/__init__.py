"""The hf-optim demo: AdamW and the hf-optim optimizers on an instruction task with wrong labels.

Run ``python -m hf_optim.demo`` (or ``hf-optim-demo``); ``--help`` lists the options. It builds
its own data (:mod:`hf_optim.demo.task`), trains a small GPT-2 from a config once per
optimizer through the Hugging Face Trainer (:mod:`hf_optim.demo.run`, recipes in
:mod:`hf_optim.demo.contenders`), and writes a table, ``results.json`` and
``learning_curves.png`` (:mod:`hf_optim.demo.report`). This package imports transformers; the
optimizers themselves never import it.
"""

from .cli import main

__all__ = ["main"]
