from guard.cli import app

app(prog_name="guard")
