"""The CUDA-graph replay of the model must give the eager model's outputs, batch after batch.

Needs a GPU: skipped on CPU-only machines (CI); run on the GPU box with
`PYTHONPATH=. python3 -m pytest tests/test_cuda_graphs.py`.
"""

import pytest
import torch

from pipeline.decode import Batch, Preprocess
from pipeline.gpu_decode import GpuDecoder
from pipeline.infer import Classifier, GraphedForward
from pipeline.model import build_model, preprocessing_transforms, resolve_weights

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
TRANSFORMS = preprocessing_transforms()


@needs_cuda
def test_replays_give_the_eager_outputs_for_each_new_batch(weights_file):
    device = torch.device("cuda")
    model = build_model(resolve_weights(str(weights_file), seed=0))
    classifier = Classifier(model, device, TRANSFORMS.mean, TRANSFORMS.std, topk=5, dtype=torch.float16)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [torch.randint(0, 256, (8, 3, 224, 224), generator=generator, device=device).half() for _ in range(3)]

    with torch.inference_mode():
        graphed = GraphedForward(classifier.forward, batches[0])
        for images in batches:  # each replay sees its own input, not the captured one
            got = [t.clone() for t in graphed(images)]
            expected = classifier.forward(images)
            torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-3)
            assert torch.equal(got[1], expected[1])
        assert not graphed.takes(batches[0][:4]), "another shape goes to the eager model"


@needs_cuda
def test_the_classifier_scores_the_same_with_and_without_graphs(weights_file):
    device = torch.device("cuda")
    model = build_model(resolve_weights(str(weights_file), seed=0))
    generator = torch.Generator().manual_seed(1)
    batches = [Batch(indices=torch.arange(i * 4, i * 4 + 4), errors=[None] * 4,
                     images=torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, generator=generator),
                     decoded_at=[0, 1, 2, 3], encoded=torch.empty(0, dtype=torch.uint8), encoded_sizes=[],
                     encoded_at=[]) for i in range(4)]
    results = {}
    for graphs in (False, True):
        decoder = GpuDecoder(device, Preprocess.from_transforms(TRANSFORMS), batch_size=4, dtype=torch.float16)
        classifier = Classifier(model, device, TRANSFORMS.mean, TRANSFORMS.std, topk=5, dtype=torch.float16,
                                decoder=decoder, cuda_graphs=graphs)
        results[graphs] = list(classifier.score(batches))
        assert (classifier._graphed is not None) == graphs

    for eager, graphed in zip(results[False], results[True], strict=True):
        assert abs(eager.logits - graphed.logits).max() < 1e-2
        assert (eager.topk_labels[:, 0] == graphed.topk_labels[:, 0]).all()
