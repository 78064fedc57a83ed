"""The README's opening picture: turntable frames of 3D shapes demo runs, one row an object.

    python docs/solids_picture.py RUNS OUT.png "red sphere" "blue cone" ...

RUNS holds docs/solids_table.py's run folders (RUNS/<colour>-<solid>). Each row: 6 frames, 60 degrees apart, of
the textured mesh's turntable, then the same 6 of its normal map (particle0/mesh_turntable.webp and
normal_turntable.webp, as the program writes them), drawn 3x larger.
"""
import os
import sys

from PIL import Image


def frames(path, count=6, zoom=3):
    movie = Image.open(path)
    picked = []
    for k in range(count):
        movie.seek(k * movie.n_frames // count)
        frame = movie.convert("RGB")
        picked.append(frame.resize((frame.width * zoom, frame.height * zoom), Image.NEAREST))
    return picked


def main(runs, out, classes):
    folders = [os.path.join(runs, name.replace(" ", "-"), "particle0") for name in classes]
    rows = [frames(os.path.join(f, "mesh_turntable.webp")) + frames(os.path.join(f, "normal_turntable.webp"))
            for f in folders]
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * len(rows[0]), h * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            sheet.paste(frame, (c * w, r * h))
    sheet.save(out, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
