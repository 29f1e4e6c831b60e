from fastcnf.cli import run

run()
