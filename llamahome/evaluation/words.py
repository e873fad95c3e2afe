"""Plain English words for the generated tasks (keys, common words), embedded so runs are offline.

RULER draws keys as ``adjective-noun`` pairs from the wonderwords lists; these are a small
hand-picked subset of everyday words of the same kind.
"""

from __future__ import annotations

ADJECTIVES = tuple(
    """
    able active afraid agile amber ancient angry anxious arctic autumn awake bitter blue bold
    brave bright brisk broken calm careful cheap cheerful clever cloudy cold cosmic crisp
    curious damp dark dear deep direct dizzy dry dusty eager early easy elder empty endless
    equal exact faint fair famous fancy fast fierce final fine firm flat fluffy fond fresh
    friendly frozen funny gentle giant glad golden grand gray great green happy hard harsh
    heavy hidden hollow honest huge humble hungry icy idle jolly juicy keen kind large late
    lazy light little lively lonely long loud lucky magic mellow mighty mild misty modern
    narrow neat nervous new noble noisy odd old orange pale patient plain polite poor proud
    purple quick quiet rapid rare raw red rich rough round royal rusty sad safe salty sharp
    shiny short shy silent silver simple slow small smooth soft solid sour spicy steady
    sticky stormy strange strong sunny sweet swift tall tame tender thick thin tidy tiny
    tough unusual vast warm wet white wide wild windy wise wooden yellow young
    """.split()
)
NOUNS = tuple(
    """
    anchor angle apple arrow badge bakery balloon banana basket beach bell bicycle bird
    blanket boat bottle branch bread bridge brush bucket butter button cabin cable camera
    candle canyon carpet castle cattle cave chair chalk cherry chimney circle city clock
    cloud coast coffee coin comet copper cottage crayon cricket crown curtain desert diamond
    dinner dolphin door dragon drum eagle engine falcon feather fence field flag flower
    forest fountain garden garlic giraffe glacier glove goat guitar hammer harbor helmet
    honey horizon horse island jacket jungle kettle kitten ladder lake lamp lantern lemon
    letter library lighthouse lion magnet mango maple market meadow mirror monkey mountain
    needle notebook ocean onion orchard otter owl paddle palace panda parrot pebble pencil
    pepper piano pillow planet pocket pond potato puzzle rabbit railway rainbow ribbon river
    rocket saddle sailor salmon sandal scarf shadow shell shovel signal silk sparrow spider
    spoon squirrel stable statue stone storm sugar summit sunset table teapot temple thunder
    ticket tiger timber tomato tower tractor trumpet tunnel turtle umbrella valley vessel
    village violin wagon walnut whale whistle window winter wizard yogurt zebra
    """.split()
)
