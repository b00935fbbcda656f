"""Run INSIDE the side install (compressed-tensors 0.14.0.1 + transformers 4.57.x, see
test_checkpoint.consumers): read an export with the consumers' own readers.

    python _ct_consumer.py FOLDER IDS_FILE OUT_FILE [FOLDER IDS_FILE OUT_FILE ...]

For each folder, writes OUT_FILE (safetensors): ``mc.<name>`` = weights that compressed-tensors' ModelCompressor
decompressed into a model built from config.json, ``tf.<name>`` = the state dict of
transformers' ``AutoModelForCausalLM.from_pretrained`` and ``logits`` = its logits on the ids;
its metadata holds the consumer versions. No laco_kernels import here: the consumers alone.
"""
import sys

import compressed_tensors
import torch
import transformers
from compressed_tensors.compressors import ModelCompressor
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

assert "laco_kernels" not in sys.modules


def read(folder, ids_file, out_file):
    ids = load_file(ids_file)["ids"]
    out = {}

    # 1. compressed-tensors alone: parse config.json, decompress into a model built from it
    mc = ModelCompressor.from_pretrained(folder)
    assert mc is not None and mc.sparsity_config is not None, "ModelCompressor found no sparsity config"
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    mc.decompress(model_path=folder, model=model)
    if mc.sparsity_config.format == "dense":  # decompress is a no-op: the weights load as stored
        stored = load_file(f"{folder}/model.safetensors")
        model.load_state_dict(dict(mc.sparsity_compressor.decompress_from_state_dict(stored)), strict=False)
    out.update({f"mc.{k}": v.clone() for k, v in model.state_dict().items()})

    # 2. transformers' from_pretrained (its CompressedTensorsHfQuantizer decompresses)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    with torch.no_grad():
        out["logits"] = model(input_ids=ids).logits.contiguous()
    out.update({f"tf.{k}": v.clone() for k, v in model.state_dict().items()})
    save_file(out, out_file, metadata={"transformers": transformers.__version__,
                                       "compressed_tensors": compressed_tensors.__version__,
                                       "dtype": str(model.dtype)})


args = sys.argv[1:]
assert args and len(args) % 3 == 0, "usage: FOLDER IDS_FILE OUT_FILE [...]"
for i in range(0, len(args), 3):
    read(*args[i:i + 3])
