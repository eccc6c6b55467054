"""Plain English words for the RULER tasks that need a vocabulary (`ruler_tasks`): the
needle keys of niah ("adjective-noun", as RULER forms them) and the word lists of `cwe`.

RULER draws these from the `wonderwords` package's lists; this is a smaller list of common
words written for this project (dedicated to the public domain), so that nothing has to
be installed or downloaded. 169 adjectives x 333 nouns give 56,277 distinct keys; cwe
draws from all 628 words (adjectives, nouns and verbs), enough for its lists up to about
8k tokens (longer cwe prompts come out shorter than asked, as RULER's do when its list
runs out)."""

ADJECTIVES = tuple("""
able absent acid active agile ancient angry awake bare bitter black blank bold brave brief
bright broad broken brown busy calm careful cheap chief clean clear clever close cloudy cold
common cool crazy crisp cruel curly damp dark dear deep dense dirty dizzy dry dull eager
early easy elder empty equal even exact fair faint false famous fancy fast fat fierce final
fine firm flat fond foreign free fresh full funny gentle giant glad golden grand great green
grey happy hard harsh heavy high hollow honest hot huge humble hungry icy idle jolly keen
kind large late lazy lean light little lively local lonely long loose loud lovely low loyal
lucky mad main mild minor modern moist narrow neat new nice noble odd old open orange pale
plain polite poor proud pure purple quick quiet rapid rare raw ready red rich rigid ripe
rough round royal rude rusty sad safe salty sandy sharp shiny short shy silent silky silly
simple slim slow small smooth soft solid sour spare steep
""".split())

NOUNS = tuple("""
acorn actor airport album anchor angle animal ankle answer apple apron arch arm army arrow
artist autumn axe baby bag bakery ball balloon banana band bank barn basket bath beach bean
bear beard bed bee bell belt bench berry bicycle bird blanket boat body bone book boot
bottle bowl box branch bread brick bridge brother brush bucket button cabin cable cake
camel camera camp candle canoe canyon cap captain car card carpet carrot castle cat cave
chain chair chalk cheese cherry chest chicken child chimney church circle city clock cloud
coat coffee coin collar comet cook copper corn cotton cousin cow crab crayon cricket crown
cup curtain cushion daisy dancer desert desk diamond dinner doctor dog doll dolphin door
dragon drawer dream dress drum duck eagle ear earth egg elbow engine eye fabric face falcon
farm feather fence field finger fire fish flag flame flower flute fog foot forest fork
fountain fox frog fruit garden gate ghost gift giraffe glass glove goat gold grape grass
guitar hammer hand harbor hat hawk heart helmet hill honey horn horse hotel house island
jacket jar jelly jewel judge kettle key kitten knee knife ladder lake lamp lantern leaf
lemon letter library lion lizard lock magnet map maple marble market meadow melon mirror
monkey moon mountain mouse mug nail needle nest net night nose notebook ocean office onion
orchard owl oyster paint palace pancake paper parrot peach pear pearl pencil pepper piano
pillow pilot pine planet plate pocket pond potato puppet queen rabbit radio rain rainbow
ribbon river road robin rock roof rope rose sail salad sand saddle school scissors sea
shadow sheep shell ship shoe shore silver singer sister sky snail snake snow soap sock
spider spoon square squirrel stair star stone storm street sugar sun swan table teacher
tent thread throne thunder tiger toast tomato tooth tower town toy train tree truck tulip
tunnel turtle umbrella valley vase village violin wagon wall walnut watch water whale wheel
whistle willow window wing winter wizard wolf wood
""".split())

VERBS = tuple("""
accept admire agree allow answer appear arrive ask bake balance bathe beg behave believe
belong blink boil borrow bounce breathe brush build bump burn buzz calculate call carry
carve catch change charge chase cheer chew clap climb collect comb compare complain count
cover crawl cross cry dance deliver depend describe destroy dig divide drag dream drop dry
earn enjoy enter escape explain fasten fetch fill float flow fold follow forgive gather
glow grab greet grin guard guess hammer hang happen harm hate heal hope hug hunt hurry
ignore imagine improve include invent invite jog juggle jump kick kneel knit knock laugh
learn lift listen load look march marry measure melt mend milk mix move nod notice obey
observe offer open order pack paddle paint park pass peel plant play point polish pour pray
""".split())

WORDS = tuple(dict.fromkeys(ADJECTIVES + NOUNS + VERBS))  # cwe's vocabulary, each word once
