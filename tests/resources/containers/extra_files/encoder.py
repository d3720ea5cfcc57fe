"""Hostile test encoder: answers, plus a file nobody asked for."""


from _contract import answer

answer()
with open("/output/notes.txt", "w") as f:
    f.write("hello")
