from compact.cli import run

run()
