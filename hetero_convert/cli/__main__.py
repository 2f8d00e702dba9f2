from . import app

app(prog_name="hetero-convert")
