"""Stage `prepare`: fetch MNIST (md5-verified) and write train, validation and test tensors.

usage: python pipeline/prepare.py RAW_DIR OUT_DIR
(RAW_DIR caches the downloaded files; $VAELAB_MNIST_MIRROR names a folder or URL to fetch them from.)
"""
from vaelab import config, data
from vaelab.stages import atomic_file, check_writable, paths, run_stage


def main(argv):
    params = config.load()
    raw_dir, out_dir = paths(argv, "RAW_DIR", "OUT_DIR")
    check_writable(raw_dir, out_dir)
    splits = data.prepare(raw_dir, val_size=params.val_size, seed=params.seed)
    for name, split in splits.items():
        with atomic_file(out_dir / f"{name}.pt") as path:
            data.save_split(split, path)
    with atomic_file(out_dir / data.SPLIT_SETTINGS) as path:  # last: splits without it are not trusted
        data.save_split_settings(path, val_size=params.val_size, seed=params.seed)
    print(", ".join(f"{name}: {len(split.labels)} images" for name, split in splits.items()), "->", out_dir)


if __name__ == "__main__":
    run_stage(main)
