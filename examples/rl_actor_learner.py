"""Reinforcement learning with an agent and observers over RPC, with torchrpc.

As in PyTorch's tutorial "Getting Started with Distributed RPC Framework" (its
REINFORCE part): the agent ("agent", rank 0) holds the policy network and the
learner; each observer ("observer1", ...) holds its own environment. For every
episode the agent asks all observers, with ``rpc_async``, to play one; an observer
plays by calling back into the agent through the agent's RRef:
``agent_rref.rpc_sync().select_action(...)`` for each action and
``agent_rref.rpc_sync().report_reward(...)`` for each reward. The agent keeps the
log-probabilities of the actions it chose, so when all observers are done it
updates the policy with REINFORCE over all their episodes at once.

The environment is the classic cart-pole (balance a pole on a cart by pushing
it left or right; reward 1 per step the pole stays up), written here in plain
Python with the equations and limits of gym's CartPole, episodes capped at
``--max-steps``. A random policy lasts about 20 steps.

Run ``python examples/rl_actor_learner.py``, or e.g. ``--observers 3 --episodes 50``.
The workers are local processes; MASTER_ADDR / MASTER_PORT are used when set,
else a free port is picked.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import socket
import sys
import threading
import time

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Categorical

import torchrpc as rpc

GAMMA = 0.99


# --------------------------------------------------------------------------
# The environment, on each observer
# --------------------------------------------------------------------------


class CartPole:
    """Cart-pole balancing: state (x, x_dot, theta, theta_dot); actions 0 (push left), 1 (push right)."""

    gravity, cart_mass, pole_mass, half_pole_length = 9.8, 1.0, 0.1, 0.5
    force, dt = 10.0, 0.02
    theta_limit, x_limit = 12 * 2 * math.pi / 360, 2.4  # the episode ends past these

    def __init__(self, seed: int, max_steps: int) -> None:
        self.rng = random.Random(seed)
        self.max_steps = max_steps
        self.state = [0.0] * 4
        self.steps = 0

    def reset(self) -> torch.Tensor:
        self.state = [self.rng.uniform(-0.05, 0.05) for _ in range(4)]
        self.steps = 0
        return torch.tensor(self.state)

    def step(self, action: int) -> tuple[torch.Tensor, float, bool]:
        """Apply ``action`` for one time step: (next state, reward, done)."""
        x, x_dot, theta, theta_dot = self.state
        force = self.force if action == 1 else -self.force
        total_mass = self.cart_mass + self.pole_mass
        pole_mass_length = self.pole_mass * self.half_pole_length
        cos, sin = math.cos(theta), math.sin(theta)
        temp = (force + pole_mass_length * theta_dot ** 2 * sin) / total_mass
        theta_acc = (self.gravity * sin - cos * temp) / (
            self.half_pole_length * (4 / 3 - self.pole_mass * cos ** 2 / total_mass))
        x_acc = temp - pole_mass_length * theta_acc * cos / total_mass
        # Euler integration, as gym does
        x, x_dot = x + self.dt * x_dot, x_dot + self.dt * x_acc
        theta, theta_dot = theta + self.dt * theta_dot, theta_dot + self.dt * theta_acc
        self.state = [x, x_dot, theta, theta_dot]
        self.steps += 1
        fell = abs(x) > self.x_limit or abs(theta) > self.theta_limit
        return torch.tensor(self.state), 1.0, fell or self.steps >= self.max_steps


class Observer:
    """Lives on an observer worker (created there by the agent with ``rpc.remote``)."""

    def __init__(self, max_steps: int, seed: int) -> None:
        self.id = rpc.get_worker_info().id
        self.env = CartPole(seed=seed + self.id, max_steps=max_steps)

    def run_episode(self, agent_rref: rpc.RRef) -> float:
        """Play one episode, asking the agent for every action; return the total reward."""
        state, done, total = self.env.reset(), False, 0.0
        while not done:
            action = agent_rref.rpc_sync().select_action(self.id, state)
            state, reward, done = self.env.step(action)
            agent_rref.rpc_sync().report_reward(self.id, reward)
            total += reward
        return total


# --------------------------------------------------------------------------
# The agent: policy and learner, on rank 0
# --------------------------------------------------------------------------


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 64)
        self.fc2 = nn.Linear(64, 2)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.fc2(F.relu(self.fc1(state))), dim=-1)


class Agent:
    def __init__(self, observers: list[str], max_steps: int, lr: float, seed: int) -> None:
        torch.manual_seed(seed)
        self.policy = Policy()
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.agent_rref = rpc.RRef(self)  # observers call back into the agent through this
        self.ob_rrefs = [rpc.remote(name, Observer, args=(max_steps, seed)) for name in observers]
        ob_ids = [rpc.get_worker_info(name).id for name in observers]
        # What each observer's current episode produced; select_action and report_reward
        # run on RPC threads, one observer each, so every observer has its own lists.
        self.saved_log_probs: dict[int, list[torch.Tensor]] = {i: [] for i in ob_ids}
        self.rewards: dict[int, list[float]] = {i: [] for i in ob_ids}
        # Each observer's actions are sampled with its own generator, so the random
        # numbers an observer gets do not depend on how the observers' calls interleave.
        self.generators = {i: torch.Generator().manual_seed(seed * 1000 + i) for i in ob_ids}
        self.policy_lock = threading.Lock()  # the policy's forward runs on many threads

    # -- called by observers, through agent_rref ---------------------------------------

    def select_action(self, ob_id: int, state: torch.Tensor) -> int:
        with self.policy_lock:
            probs = self.policy(state.unsqueeze(0))
        action = torch.multinomial(probs, 1, generator=self.generators[ob_id]).squeeze(1)
        self.saved_log_probs[ob_id].append(Categorical(probs).log_prob(action))
        return action.item()

    def report_reward(self, ob_id: int, reward: float) -> None:
        self.rewards[ob_id].append(reward)

    # -- driven by the training loop --------------------------------------------------

    def run_episode(self) -> list[float]:
        """Every observer plays one episode at the same time; their total rewards."""
        futs = [ob_rref.rpc_async().run_episode(self.agent_rref) for ob_rref in self.ob_rrefs]
        return torch.futures.wait_all(futs)

    def finish_episode(self) -> None:
        """One REINFORCE update of the policy from every observer's last episode."""
        log_probs, returns = [], []
        for ob_id, rewards in self.rewards.items():
            R, ob_returns = 0.0, []
            for r in reversed(rewards):  # discounted return from each step on
                R = r + GAMMA * R
                ob_returns.append(R)
            returns.extend(reversed(ob_returns))
            log_probs.extend(self.saved_log_probs[ob_id])
            self.rewards[ob_id], self.saved_log_probs[ob_id] = [], []
        returns_t = torch.tensor(returns)
        returns_t = (returns_t - returns_t.mean()) / (returns_t.std() + 1e-6)  # a baseline, and scale
        loss = -(torch.cat(log_probs) * returns_t).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def train(args: argparse.Namespace, world_size: int) -> None:
    observers = [f"observer{r}" for r in range(1, world_size)]
    agent = Agent(observers, args.max_steps, args.lr, args.seed)
    log(f"{len(observers)} observer(s), up to {args.episodes} episodes of at most {args.max_steps} steps")
    t0 = time.perf_counter()
    running_reward = 0.0
    mean_rewards = []
    for episode in range(1, args.episodes + 1):
        ep_rewards = agent.run_episode()
        agent.finish_episode()
        mean_rewards.append(sum(ep_rewards) / len(ep_rewards))
        # As in the tutorial, the running reward follows each round's worst episode.
        running_reward = 0.1 * min(ep_rewards) + 0.9 * running_reward
        solved = running_reward >= args.solved_at
        if episode % args.log_every == 0 or episode == args.episodes or solved:
            log(f"episode {episode:4d}  rewards {' '.join(f'{r:3.0f}' for r in ep_rewards)}  "
                f"running reward {running_reward:5.1f}")
        if solved:
            log(f"solved: running reward {running_reward:.1f} >= {args.solved_at:g}")
            break
    k = min(10, len(mean_rewards))
    log(f"{len(mean_rewards)} episodes in {time.perf_counter() - t0:.1f}s; mean reward per episode: "
        f"first {k} {sum(mean_rewards[:k]) / k:.1f}, last {k} {sum(mean_rewards[-k:]) / k:.1f}")


def log(msg: str) -> None:
    sys.stdout.write(f"[agent] {msg}\n")
    sys.stdout.flush()


def worker(rank: int, world_size: int, addr: str, port: str, args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)  # several processes share few cores
    rpc.init_rpc("agent" if rank == 0 else f"observer{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        train(args, world_size)
    # Observers only serve the agent's calls until everyone shuts down.
    rpc.shutdown()


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--observers", type=int, default=2, help="number of observers (default 2)")
    parser.add_argument("--episodes", type=int, default=300, help="at most this many episodes (default 300)")
    parser.add_argument("--max-steps", type=int, default=200, help="episode length cap (default 200)")
    parser.add_argument("--solved-at", type=float, default=150,
                        help="stop when the running reward reaches this (default 150)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--log-every", type=int, default=10, help="log every N episodes (default 10)")
    args = parser.parse_args(argv)
    if min(args.observers, args.episodes, args.max_steps, args.log_every) < 1:
        parser.error("--observers, --episodes, --max-steps and --log-every must be positive")
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT") or free_port()
    world_size = args.observers + 1
    try:
        # Starts the processes and waits for them; if one fails, the others are stopped.
        mp.spawn(worker, args=(world_size, addr, port, args), nprocs=world_size, join=True)
    except Exception as e:  # mp.ProcessRaisedException / ProcessExitedException
        print(f"rl_actor_learner: failed: {e}", file=sys.stderr)
        return 1
    print("rl_actor_learner: all workers shut down cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
