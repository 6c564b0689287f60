"""Test and development harness, kept out of the product code path (issue 14).

Nothing under `x2l/` outside this package imports it at module level; the product imports a piece lazily only where
a user-facing command is itself a harness command (`x2l tiny-model`, `x2l demo`, `make s3`, the needle benchmark's
video writer).

ray_head.py     a throwaway local Ray head on 127.0.0.1, dying with its parent (demo, tests, benches)
s3_server.py    a throwaway local S3 server (SeaweedFS `weed`) on 127.0.0.1 (`make s3`, tests, benches)
tiny_models.py  small random checkpoints in the standard HF layout, built offline (`x2l tiny-model`)
tiny_qwen3_vl.py  the same for Qwen3-VL (`x2l tiny-model --family qwen3-vl`)
tiny_llava_onevision.py  the same for LLaVA-OneVision (`x2l tiny-model --family llava-onevision`)
checkpoints.py  what every tiny builder shares: sizes, dtypes, the seeded save of model, tokenizer and JSON files
videos.py       synthetic video files of every kind x2l must decode (VFR, edit lists, AV1, WebM, GIF, ...)
"""
