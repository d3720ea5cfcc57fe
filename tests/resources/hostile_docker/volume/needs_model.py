"""Test encoder that reads weights the image keeps under its VOLUME /opt/data (hidden in the sandbox)."""
from _contract import answer

with open("/opt/data/model.bin") as f:
    f.read()
answer()
