"""Sign descent as a kfacbench Method: the single-file plugin of docs/plugins.md."""

import torch

from kfacbench import Method, Param, method_spec


class SignSGD(Method):
    def __init__(self, problem, *, lr: float = 0.01) -> None:
        self.problem, self.lr = problem, lr
        self.params = [p for p in problem.model.parameters() if p.requires_grad]

    def step(self, x, y, timer):
        with timer.phase("forward"):
            loss = self.problem.loss(self.problem.forward(x), y)
        with timer.phase("backward"):
            for p in self.params:
                p.grad = None
            loss.backward()
        with timer.phase("update"), torch.no_grad():
            for p in self.params:
                p.add_(p.grad.sign(), alpha=-self.lr)
        return loss.detach()


METHODS = [method_spec("signsgd", SignSGD, {"lr": Param("step size", "(0, inf)")}, "sign descent")]
