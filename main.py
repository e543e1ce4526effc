"""python main.py fit --config configs/stage1.yaml [--config configs/toy.yaml] [--ckpt_path CKPT]"""

from mpp.cli import main

if __name__ == "__main__":
    main()
