"""`python benchmarks/peftx_bench.py ...` = `peftx bench ...`, usable before the command is registered in cli/app.py."""

import typer

from peftx.cli.commands.bench_cmd import bench

if __name__ == "__main__":
    typer.run(bench)
