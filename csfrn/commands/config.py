"""``csfrn config``: the config that ``--config`` and ``--set`` resolve to, every key, as YAML."""
import sys

from ._common import add_config_options, config

PARSER = {"help": "print the resolved config (every key) as YAML",
          "description": "Print the config that --config and --set resolve to, every key, as YAML: what a training "
          "run writes to work_dir/config.yaml, loadable with --config."}
EXAMPLES = ["csfrn config --config configs/demo.yaml --set train.lr=0.02 > my.yaml", "csfrn train --config my.yaml"]


def add_arguments(parser):
    add_config_options(parser)


def run(args):
    from ..engine.run_files import config_yaml   # here, not at the top: csfrn --help stays quick
    sys.stdout.write(config_yaml(config(args)))
    return 0
