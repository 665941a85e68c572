"""A small text adventure: rooms on a grid joined by doors, a key, a locked chest. Find the key, then open the chest.

    game = TextGame(seed=3)
    obs = game.reset()                 # "You are in the hall.\n1. go north to the cellar (a key)\n2. go east to the study"
    obs, reward, done = game.step("go north")   # or game.step("1"): a number picks a listed command

Everything follows from the seed (the map, where the key and the chest are), so an episode replays exactly.
Observations are text; an action is a short command, and the observation lists, numbered, the ones that do
something here (a reply may give the number instead). Through a door the player glimpses what lies in the next room. Reward 0.5 for taking the key
and 1 when the chest opens (`won`); an episode ends there or after `max_turns` commands. `optimal_action` (which knows the map) and
`random_action` (a uniform choice among the listed commands) are the two reference players.
"""

from __future__ import annotations

import random
import re
from collections import deque

ROOMS = ["hall", "kitchen", "library", "garden", "cellar", "study", "attic", "pantry", "bedroom", "cave"]
DIRECTIONS = {"north": (0, 1), "south": (0, -1), "east": (1, 0), "west": (-1, 0)}
GOAL = "You play a text adventure. Find the key, take it, then open the chest. Reply with one command."


class TextGame:
    def __init__(self, seed: int, num_rooms: int = 5, max_turns: int = 12) -> None:
        rng = random.Random(seed)
        self.max_turns = max_turns
        self.names = rng.sample(ROOMS, num_rooms)
        cells = [(0, 0)]
        self.doors: dict[int, dict[str, int]] = {0: {}}  # room -> {direction: room}; a tree, grown room by room
        while len(cells) < num_rooms:
            room, (direction, (dx, dy)) = rng.randrange(len(cells)), rng.choice(list(DIRECTIONS.items()))
            cell = (cells[room][0] + dx, cells[room][1] + dy)
            if cell in cells:
                continue
            back = next(d for d, v in DIRECTIONS.items() if v == (-dx, -dy))
            new = len(cells)
            cells.append(cell)
            self.doors[new] = {back: room}
            self.doors[room][direction] = new
        self.start = rng.randrange(num_rooms)
        self.key_room, self.chest_room = rng.sample([r for r in range(num_rooms) if r != self.start], 2)
        self.reset()

    def reset(self, carry_key: bool = False) -> str:
        """The first observation. `carry_key`: start with the key already taken (the game's second half)."""
        self.room, self.turns, self.done, self.won = self.start, 0, False, False
        self.key_at = None if carry_key else self.key_room  # None: the player carries the key
        return self.observation()

    def commands(self) -> list[str]:
        listed = [f"go {d}" for d in self.doors[self.room]]
        if self.key_at == self.room:
            listed.append("take key")
        if self.room == self.chest_room:
            listed.append("open chest")
        return listed

    def _contents(self, room: int) -> list[str]:
        return (["a key"] if self.key_at == room else []) + (["a locked chest"] if room == self.chest_room else [])

    def observation(self, prefix: str = "") -> str:
        """Where the player is, what is here, and the numbered commands; a door shows what lies behind it."""
        here, listed = self._contents(self.room), []
        for i, command in enumerate(self.commands(), 1):
            room = self.doors[self.room].get(command[3:]) if command.startswith("go ") else None
            glimpse = f" ({' and '.join(self._contents(room))})" if room is not None and self._contents(room) else ""
            listed.append(f"{i}. {command}" + (f" to the {self.names[room]}{glimpse}" if room is not None else ""))
        return (f"{prefix}You are in the {self.names[self.room]}." + (f" Here: {' and '.join(here)}." if here else "")
                + (" You carry the key." if self.key_at is None else "") + "\n" + "\n".join(listed))

    def step(self, action: str) -> tuple[str, float, bool]:
        assert not self.done, "episode is over: reset()"
        self.turns += 1
        command = parse_command(action, self.commands())
        reward, prefix = 0.0, "Nothing happens. "
        if command is not None and command.startswith("go "):
            self.room, prefix = self.doors[self.room][command[3:]], ""
        elif command == "take key":
            self.key_at, reward, prefix = None, 0.5, "You take the key. "
        elif command == "open chest":
            if self.key_at is None:
                reward, self.done, self.won, prefix = 1.0, True, True, "You open the chest. You win! "
            else:
                prefix = "The chest is locked. "
        self.done = self.done or self.turns >= self.max_turns
        return self.observation(prefix), reward, self.done

    def distances(self, source: int) -> dict[int, int]:
        """Commands needed to walk from `source` to each room."""
        dist, queue = {source: 0}, deque([source])
        while queue:
            room = queue.popleft()
            for nxt in self.doors[room].values():
                if nxt not in dist:
                    dist[nxt] = dist[room] + 1
                    queue.append(nxt)
        return dist

    def plan_length(self) -> int:
        """Commands the optimal player still needs from here (0 once won)."""
        if self.won:
            return 0
        if self.key_at is None:
            return self.distances(self.room)[self.chest_room] + 1
        return self.distances(self.room)[self.key_at] + 1 + self.distances(self.key_at)[self.chest_room] + 1

    def optimal_action(self) -> str:
        """The first command of a shortest plan: walk to the key, take it, walk to the chest, open it."""
        target = self.key_at if self.key_at is not None else self.chest_room
        if self.room == target:
            return "take key" if self.key_at is not None else "open chest"
        first = {self.room: None}
        queue = deque([self.room])
        while queue:  # breadth-first search, remembering the first step on the way to each room
            room = queue.popleft()
            for d, nxt in self.doors[room].items():
                if nxt not in first:
                    first[nxt] = first[room] or f"go {d}"
                    queue.append(nxt)
        return first[target]

    def random_action(self, rng: random.Random) -> str:
        return rng.choice(self.commands())


def parse_command(text: str, commands: list[str]) -> str | None:
    """The listed command the reply names first ("Go north." and "I go north" both mean "go north"); a bare
    direction counts as going there, and a reply that starts with a number picks that command of the numbered
    list ("2" is the second). None when the reply names none (or a number not listed)."""
    if number := re.match(r"\s*(\d+)", text):
        return commands[int(number[1]) - 1] if 1 <= int(number[1]) <= len(commands) else None
    text = re.sub(r"[^a-z ]", " ", text.lower())
    words = text.split()
    found = []
    for c in commands:
        verb, obj = c.split()
        for i, w in enumerate(words):
            if w == obj and (verb == "go" or (i > 0 and words[i - 1] in (verb, "the"))):
                found.append((i, c))
                break
    return min(found)[1] if found else None
