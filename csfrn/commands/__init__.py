"""The ``csfrn`` verbs, one module each (``csfrn.commands.<verb>``), the floor above the library.

Each module has ``PARSER`` (the keyword arguments of its sub-parser: ``help``, the line in ``csfrn --help``, and
``description``), ``EXAMPLES`` (the lines at the end of its ``--help``), ``add_arguments(parser)`` (its options)
and ``run(args)`` (runs the verb, returns the exit status). The glue of a verb (checkpoint -> model -> files)
lives in its module too, e.g. :func:`csfrn.commands.eval.evaluate_checkpoint`. A new verb is a new module with
those four names, and its name in :data:`VERBS`.

:mod:`csfrn.cli` builds every verb's parser for each command line, so a verb module imports at its top only
what is light (argparse, the config tree, :mod:`csfrn.errors`, :mod:`csfrn.engine.outputs`); the library that
imports torch is imported inside ``run`` and the glue functions, so that ``csfrn --help`` and ``csfrn VERB --help``
take a fraction of a second.
"""

# In the order of `csfrn --help`.
VERBS = (
    "train",
    "eval",
    "predict",
    "export",
    "visualize",
    "flops",
    "bench",
    "demo",
    "ablate",
    "config",
    "plot",
    "browse",
)
