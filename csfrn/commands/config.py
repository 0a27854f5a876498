"""``csfrn config``: the config that ``--config`` and ``--set`` resolve to, every key, as YAML."""

import sys

from ..configs import listing
from ._common import add_config_options, config

PARSER = {
    "help": "print the resolved config (every key) as YAML",
    "description": "Print the config that --config and --set resolve to, every key, as YAML: what a training "
    "run writes to work_dir/config.yaml, loadable with --config.",
}
EXAMPLES = [
    "csfrn config --list                                       # the shipped configs' names",
    "csfrn config --config demo --set train.lr=0.02 > my.yaml",
    "csfrn train --config my.yaml",
]


def add_arguments(parser):
    add_config_options(parser)
    parser.add_argument("--list", action="store_true", help="name the shipped configs (--config NAME), then exit")


def run(args):
    if args.list:
        sys.stdout.write(listing())
        return 0
    from ..engine.run_files import config_yaml  # here, not at the top: csfrn --help stays quick

    sys.stdout.write(config_yaml(config(args)))
    return 0
