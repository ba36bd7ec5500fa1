from cfx.cli import run

run()
