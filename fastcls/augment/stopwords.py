"""English function words that EDA never replaces and never takes as the source of an insertion (the list is
fastcls's own: articles, pronouns, prepositions, conjunctions, auxiliaries and modals, and the pieces that
contractions split into). Matched against the lower-cased word."""

STOP_WORDS = frozenset("""
a an the this that these those some any each every either neither no nor not all both few many much more most
other another such own same
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her hers
herself it its itself they them their theirs themselves one ones
who whom whose which what whatever whoever when where why how whether
and but or so yet if then else than because as while until unless although though since
of at by for with about against between into through during before after above below to from up down in out on
off over under again further once onto upon via per among within without toward towards
am is are was were be been being have has had having do does did doing done
can could may might must shall should will would ought
here there now just only very too also even still already ever never always
s t d ll m o re ve n't 's 're 've 'll 'd 'm don't doesn't didn't isn't aren't wasn't weren't can't couldn't won't
wouldn't shouldn't hasn't haven't hadn't i'm you're he's she's it's we're they're i've you've we've they've i'll
you'll he'll she'll we'll they'll i'd you'd he'd she'd we'd they'd that's there's what's let's
""".split())
