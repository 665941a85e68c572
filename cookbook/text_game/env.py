"""A small text adventure: rooms on a grid joined by doors, a key, a locked chest. Find the key, then open the chest.

    game = TextGame(seed=3)
    obs = game.reset()        # "You are in the hall.\n- go north to the cellar (a key; command 1)\n- go east to ..."
    obs, reward, done = game.step("go north")   # or game.step("1"): a number picks a listed command

Everything follows from the seed (the map, where the key and the chest are), so an episode replays exactly.
Observations are text; an action is a short command, and the observation lists, numbered, the ones that do something
here (a reply may give the number instead). Each door says what the player knows lies that way: what it glimpses in
the next room, the way to a key or chest it saw earlier, or "unexplored" while it has not seen what it needs next.
So a player that reads only the current observation can play well (`reactive_action`, which wins 98 % of maps).
Reward 0.5 for taking the key and 1 when the chest opens (`won`); an episode ends there or after `max_turns`
commands. `optimal_action` (which knows the whole map) and `random_action` (a uniform choice among the listed
commands) are the two reference players."""

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
        self.visited = {self.start}  # rooms entered; the player also saw each one's neighbours through its doors
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

    def seen(self) -> set[int]:
        """Rooms the player has entered or glimpsed through a door of a room it entered."""
        return self.visited | {r for v in self.visited for r in self.doors[v].values()}

    def beyond(self, room: int, via: int) -> set[int]:
        """The rooms reached through the door from `via` to `room` (the map is a tree): `room` and what lies past it."""
        return {r for r, d in self.distances(room).items() if d < self.distances(via).get(r, 0)}

    def hint(self, room: int) -> str:
        """What the player knows lies through the door to `room`: what it glimpses there, the way to a key or chest
        it saw earlier (the memory a player of the observation alone would otherwise lack) and, while it has not
        seen what it needs next, "unexplored" on the doors towards rooms seen but not entered."""
        seen, past = self.seen(), self.beyond(room, self.room)
        tags = self._contents(room) + [f"the way to the {thing}" for thing, at in (("key", self.key_at),
                                       ("chest", self.chest_room)) if at not in (None, room) and at in seen & past]
        if (self.key_at if self.key_at is not None else self.chest_room) not in seen and past & (seen - self.visited):
            tags.append("unexplored")
        return ", ".join(tags)

    def observation(self, prefix: str = "") -> str:
        """Where the player is, what is here, and the numbered commands; a door says what the player knows lies
        that way (`hint`), so the observation alone suffices to play well."""
        here, listed = self._contents(self.room), []
        for i, command in enumerate(self.commands(), 1):
            room = self.doors[self.room].get(command[3:]) if command.startswith("go ") else None
            tag = self.hint(room) + "; " if room is not None and self.hint(room) else ""
            listed.append(f"- {command}" + (f" to the {self.names[room]}" if room is not None else "")
                          + f" ({tag}command {i})")
        return (f"{prefix}You are in the {self.names[self.room]}." + (f" Here: {' and '.join(here)}." if here else "")
                + (" You carry the key." if self.key_at is None else "") + "\n" + "\n".join(listed))

    def step(self, action: str) -> tuple[str, float, bool]:
        assert not self.done, "episode is over: reset()"
        self.turns += 1
        command = parse_command(action, self.commands())
        reward, prefix = 0.0, "Nothing happens. "
        if command is not None and command.startswith("go "):
            self.room, prefix = self.doors[self.room][command[3:]], ""
            self.visited.add(self.room)
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


def reactive_action(observation: str) -> str:
    """A scripted player that reads only the observation (no memory, no map): take the key, open the chest once
    carrying it, else the first door towards what it needs next, else the first unexplored door. Its number."""
    lines = observation.split("\n")[1:]
    need = "chest" if "You carry the key." in observation else "key"
    glimpse = "a locked chest" if need == "chest" else "a key"
    for wanted in ["take key"] + (["open chest"] if need == "chest" else []) + [glimpse, f"the way to the {need}",
                                                                                 "unexplored"]:
        for line in lines:
            if wanted in line:
                return re.findall(r"command (\d+)\)$", line)[0]
    return "1"


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
